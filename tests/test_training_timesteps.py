"""Statistics and contracts of the per-sample SCFM step sampler."""

import math

import pytest
import torch

from scfm_diffusers.sigmas import DEFAULT_MAX_SIGMA, fixed_shift, resolution_mu, scfm_sigmas, uniform_sigmas
from scfm_diffusers.training.timesteps import GridSamplerConfig, StepSample, TargetSource, sample_grid_steps

N = 20_000


def draw(config: GridSamplerConfig, n: int = N, seed: int = 0, **kwargs) -> StepSample:
    return sample_grid_steps(n, config, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_default_statistics():
    config = GridSamplerConfig(dynamic_shift_prob=0.0)
    s = draw(config)
    assert s.sigma.dtype == s.d1.dtype == s.d2.dtype == s.shift.dtype == torch.float32
    assert s.source.dtype == s.grid_size.dtype == torch.long
    # ±4.5 standard deviations of a binomial share.
    tol = 4.5 * math.sqrt(0.4 * 0.6 / N)
    assert abs(s.is_teacher.double().mean().item() - 0.4) < tol
    assert not s.is_flow_matching.any()
    assert (s.is_teacher | s.is_self).all()
    assert (s.grid_size[s.is_teacher] == 32).all()
    self_sizes = s.grid_size[s.is_self]
    counts = torch.stack([(self_sizes == m).sum() for m in (2, 4, 8, 16)]).double()
    assert counts.sum() == len(self_sizes)
    assert (counts / counts.sum() - 0.25).abs().max() < 4.5 * math.sqrt(0.25 * 0.75 / len(self_sizes))
    assert s.shift.min() >= 2.5 and s.shift.max() <= 4.5
    assert s.shift.min() < 2.55 and s.shift.max() > 4.45
    assert (s.d1 > 0).all() and (s.d2 > 0).all()
    assert (s.sigma - s.d1 - s.d2 >= -1e-6).all()
    assert (s.sigma <= DEFAULT_MAX_SIGMA).all()
    assert (s.sigma == torch.tensor(DEFAULT_MAX_SIGMA, dtype=torch.float32)).any()


def test_points_lie_on_the_shifted_grid_at_even_index():
    config = GridSamplerConfig(dynamic_shift_prob=0.0, teacher_grid_size_min=4, teacher_grid_size_max=12)
    s = draw(config, n=500)
    for i in range(len(s)):
        m = int(s.grid_size[i])
        grid = fixed_shift(uniform_sigmas(m), float(s.shift[i])).clamp(max=DEFAULT_MAX_SIGMA)
        # The shift is stored in float32, so compare to the recomputed grid with a float32 tolerance.
        j = int((grid - float(s.sigma[i])).abs().argmin())
        assert j % 2 == 0 and j <= m - 2
        expected = torch.stack([grid[j], grid[j] - grid[j + 1], grid[j + 1] - grid[j + 2]]).float()
        torch.testing.assert_close(torch.stack([s.sigma[i], s.d1[i], s.d2[i]]), expected, rtol=1e-5, atol=1e-6)


def test_every_even_index_and_teacher_size_is_drawn():
    config = GridSamplerConfig(
        teacher_ratio=1.0, teacher_grid_size_min=2, teacher_grid_size_max=8, dynamic_shift_prob=0.0
    )
    s = draw(config, n=4000)
    sizes, counts = s.grid_size.unique(return_counts=True)
    assert sizes.tolist() == [2, 4, 6, 8]
    assert (counts.double() / 4000 - 0.25).abs().max() < 0.04
    # Grid size 8 has coarse steps starting at j = 0, 2, 4, 6: four distinct σ per shift value, one of them 1.
    eight = s.grid_size == 8
    at_start = s.sigma[eight] == torch.tensor(DEFAULT_MAX_SIGMA, dtype=torch.float32)
    assert abs(at_start.double().mean().item() - 0.25) < 0.06
    last = (s.sigma - s.d1 - s.d2).abs() < 1e-6  # steps that end at σ = 0
    assert abs(last[eight].double().mean().item() - 0.25) < 0.06


def test_flow_matching_share_and_teacher_sized_grid():
    config = GridSamplerConfig(teacher_ratio=0.3, flow_matching_ratio=0.2, dynamic_shift_prob=0.0)
    s = draw(config)
    tol = 4.5 * math.sqrt(0.25 / N)
    assert abs(s.is_flow_matching.double().mean().item() - 0.2) < tol
    assert abs(s.is_teacher.double().mean().item() - 0.3) < tol
    assert abs(s.is_self.double().mean().item() - 0.5) < tol
    assert (s.grid_size[s.is_flow_matching] == 32).all()
    assert set(s.source.unique().tolist()) == {int(v) for v in TargetSource}


def test_dynamic_shift_probability_and_value():
    config = GridSamplerConfig(dynamic_shift_prob=0.1, shift_min=2.5, shift_max=2.5)
    s = draw(config, image_seq_len=1024)
    expected = math.exp(resolution_mu(1024))
    is_dynamic = (s.shift - expected).abs() < 1e-6
    assert (is_dynamic | (s.shift == 2.5)).all()
    assert abs(is_dynamic.double().mean().item() - 0.1) < 4.5 * math.sqrt(0.09 / N)
    always = draw(GridSamplerConfig(dynamic_shift_prob=1.0), n=100, image_seq_len=4096)
    torch.testing.assert_close(always.shift, torch.full((100,), math.exp(1.15)))


def test_deterministic_given_generator_and_device():
    config = GridSamplerConfig()
    a, b = draw(config, n=64, image_seq_len=256), draw(config, n=64, image_seq_len=256)
    for name in ("sigma", "d1", "d2", "source", "grid_size", "shift"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.sigma, draw(config, n=64, seed=1, image_seq_len=256).sigma)
    assert a.to("cpu").sigma.device.type == "cpu"
    assert len(a) == 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher_ratio": 1.5}, "teacher_ratio"),
        ({"teacher_ratio": 0.7, "flow_matching_ratio": 0.5}, "flow_matching_ratio must be <= 1"),
        ({"dynamic_shift_prob": -0.1}, "dynamic_shift_prob"),
        ({"teacher_grid_size_min": 3}, "even integer"),
        ({"teacher_grid_size_min": 0}, "even integer"),
        ({"teacher_grid_size_min": 16, "teacher_grid_size_max": 8}, "teacher_grid_size_min"),
        ({"self_grid_sizes": (2, 5)}, "self_grid_sizes"),
        ({"self_grid_sizes": ()}, "self_grid_sizes"),
        ({"shift_min": 0.0}, "shift_min"),
        ({"shift_min": 3.0, "shift_max": 2.0}, "shift_max"),
        ({"base_image_seq_len": 4096, "max_image_seq_len": 256}, "base_image_seq_len"),
        ({"max_sigma": 1.5}, "max_sigma"),
        ({"target_steps": (3,)}, "target_shift"),
        ({"target_steps": (0,), "target_shift": 3.0}, "target_steps"),
        ({"target_steps": (3,), "target_shift": 3.0, "target_levels": ()}, "target_levels"),
        ({"target_steps": (3,), "target_shift": -1.0}, "target_shift"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GridSamplerConfig(**kwargs)


def test_dynamic_shift_needs_seq_len_and_help_text():
    with pytest.raises(ValueError, match="image_seq_len"):
        sample_grid_steps(4, GridSamplerConfig(dynamic_shift_prob=0.1))
    sample_grid_steps(4, GridSamplerConfig(dynamic_shift_prob=0.0))
    assert all(GridSamplerConfig.help().values())
    assert GridSamplerConfig(self_grid_sizes=[4, 2]).self_grid_sizes == (4, 2)


# ----------------------------------------------------------------------------------------------------
# Step-targeted self rows (--self_grids targeted, the training script's default)
# ----------------------------------------------------------------------------------------------------
TARGETED = GridSamplerConfig(target_steps=(3, 4, 8), target_shift=1.64, dynamic_shift_prob=0.1)


def test_targeted_level_one_jumps_are_exactly_the_sampling_grid_jumps():
    s = draw(TARGETED, n=4000, image_seq_len=64)
    rows = s.is_self
    assert (s.shift[rows] == torch.tensor(1.64)).all(), "self rows must use the sampling shift, never the range"
    for n in (3, 4, 8):
        sampler_grid = scfm_sigmas(n, shift=1.64).float()  # what FlowMatchSCFMScheduler samples with
        jumps = {(round(a, 5), round(b, 5)) for a, b in zip(sampler_grid[:-1].tolist(), sampler_grid[1:].tolist())}
        level_one = rows & (s.grid_size == 2 * n)
        trained = {
            (round(a, 5), round(b, 5))
            for a, b in zip(s.sigma[level_one].tolist(), (s.sigma - s.d1 - s.d2)[level_one].tolist())
        }
        assert trained == jumps, f"{n}-step jumps: trained {sorted(trained)}, sampler {sorted(jumps)}"
        # The midpoint of each trained jump is the 2N-grid point: the half-steps the 2N-step level trains.
        half = scfm_sigmas(2 * n, shift=1.64).float()
        torch.testing.assert_close((s.sigma - s.d1)[level_one].unique(), half[1::2].unique(), rtol=0, atol=1e-6)


def test_targeted_grid_sizes_are_uniform_over_step_counts_and_levels():
    s = draw(TARGETED, image_seq_len=64)
    self_sizes = s.grid_size[s.is_self]
    # (N, level) pairs: 3 → 6, 12, 24; 4 → 8, 16, 32; 8 → 16, 32, 64 (16 and 32 are drawn for two pairs each).
    expected = {6: 1, 12: 1, 24: 1, 8: 1, 16: 2, 32: 2, 64: 1}
    counts = {m: int((self_sizes == m).sum()) for m in expected}
    assert sum(counts.values()) == len(self_sizes)
    for m, weight in expected.items():
        share = weight / 9
        assert abs(counts[m] / len(self_sizes) - share) < 4.5 * math.sqrt(share * (1 - share) / len(self_sizes))


def test_targeting_changes_self_rows_only():
    generic = GridSamplerConfig(dynamic_shift_prob=0.1, teacher_grid_size_min=16)
    targeted = GridSamplerConfig(dynamic_shift_prob=0.1, teacher_grid_size_min=16, target_steps=(4,), target_shift=3.0)
    a, b = draw(generic, n=2000, image_seq_len=256), draw(targeted, n=2000, image_seq_len=256)
    assert torch.equal(a.source, b.source)
    teacher = a.is_teacher
    for name in ("sigma", "d1", "d2", "grid_size", "shift"):
        assert torch.equal(getattr(a, name)[teacher], getattr(b, name)[teacher]), name
    assert set(b.grid_size[b.is_self].unique().tolist()) == {8, 16, 32}
    assert set(a.grid_size[a.is_self].unique().tolist()) == {2, 4, 8, 16}
    assert targeted.step_targeted and not generic.step_targeted
    assert GridSamplerConfig(target_steps=[3], target_shift=3.0, target_levels=[1, 2]).self_grid_choices() == [6, 12]
