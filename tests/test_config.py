"""SonaConfig: validation with clear errors, hashability, round trip."""

import pytest

import sona_jax as sona


def test_defaults_follow_the_seed():
  cfg = sona.SonaConfig(dim=768)
  assert (cfg.micro_rank, cfg.base_rank, cfg.pattern_clusters) == (2, 8, 50)
  assert cfg.trajectory_capacity == 10_000 and cfg.background_interval_s == 3600
  assert cfg.micro_scale == 1.0 and cfg.base_scale == 1.0


def test_config_is_frozen_and_hashable():
  cfg = sona.SonaConfig(dim=16)
  assert hash(cfg) == hash(sona.SonaConfig(dim=16))
  with pytest.raises(AttributeError):
    cfg.dim = 8  # type: ignore[misc]
  assert cfg.replace(micro_rank=1).micro_rank == 1


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("dim", 0, r"dim=0 is out of range; allowed \[1,"),
    ("dim", 3.5, "dim must be an int"),
    ("micro_rank", 3, r"micro_rank=3 is out of range; allowed \[1, 2\]"),
    ("base_rank", 2, r"base_rank=2 is out of range; allowed \[4, 16\]"),
    ("base_rank", 17, "base_rank"),
    ("micro_lr", -0.1, "micro_lr"),
    ("micro_lr", float("nan"), "micro_lr must be a finite number"),
    ("gate_quality_margin", 0.7, "gate_quality_margin"),
    ("tier_costs", (1.0, 2.0), "tier_costs has 2 entries; expected n_tiers=3"),
    ("tier_costs", (1.0, -2.0, 3.0), r"tier_costs\[1\]"),
    ("max_ids", 0, "max_ids"),
    ("graph_degree", 0, "graph_degree"),
    ("hebbian_strengthen", 1.5, "hebbian_strengthen"),
    ("signal_capacity", 0, "signal_capacity"),
    ("micro_alpha", 0.0, "micro_alpha"),
    ("min_samples", True, "min_samples must be an int"),
    ("admission_window_s", -1, r"admission_window_s=-1 is out of range; allowed \[0, inf\]"),
    ("admission_window_s", 3600.0, "admission_window_s must be an int"),
  ],
)
def test_bad_values_raise_naming_field_and_range(field, value, match):
  with pytest.raises(ValueError, match=match):
    sona.SonaConfig(**({"dim": 32} | {field: value}))


def test_base_rank_cannot_exceed_dim():
  with pytest.raises(ValueError, match="base_rank=8 must be <= dim=4"):
    sona.SonaConfig(dim=4)


def test_list_tier_costs_become_a_tuple():
  cfg = sona.SonaConfig(dim=16, tier_costs=[1, 2, 3])
  assert cfg.tier_costs == (1.0, 2.0, 3.0) and hash(cfg)


def test_admission_window_defaults_to_a_day_and_old_dicts_get_it():
  cfg = sona.SonaConfig(dim=16)
  assert cfg.admission_window_s == 86_400
  assert cfg.replace(admission_window_s=0).admission_window_s == 0
  # A config saved before the field existed (checkpoint metadata) restores with the default.
  old = cfg.replace(admission_window_s=60).to_dict()
  del old["admission_window_s"]
  assert sona.SonaConfig.from_dict(old) == cfg


def test_to_dict_round_trip_and_unknown_fields():
  cfg = sona.SonaConfig(dim=16, micro_alpha=4.0, tier_costs=(1.0, 5.0, 9.0))
  assert sona.SonaConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown fields"):
    sona.SonaConfig.from_dict({"dim": 16, "speed": 3})


def test_scales_follow_peft_alpha_over_rank():
  cfg = sona.SonaConfig(dim=16, micro_rank=2, micro_alpha=8.0, base_rank=4, base_alpha=2.0)
  assert cfg.micro_scale == 4.0 and cfg.base_scale == 0.5
