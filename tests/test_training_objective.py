"""The SCFM objective against closed-form flows (float64) and its call-order contract."""

import math

import pytest
import torch

from scfm_diffusers.training.objective import loss_by_sigma_bins, scfm_loss, scfm_target
from scfm_diffusers.training.timesteps import GridSamplerConfig, StepSample, TargetSource, sample_grid_steps

SHAPE = (3, 2)  # trailing dims of one sample


def per_sample(values, x):
    return values.reshape(-1, *([1] * (x.dim() - 1)))


def point_mass_velocity(c):
    """Marginal velocity for data x0 = c: v(x, σ) = E[ε − c | x_σ = x] = (x − c)/σ (straight trajectories)."""
    return lambda x, sigma, rows: (x - c) / per_sample(sigma, x)


class GaussianFlow:
    """Data x0 ~ N(m, s²) per element: the flow is x_σ = (1 − σ)·m + std(σ)·z with std² = (1 − σ)²s² + σ²."""

    def __init__(self, m, s):
        self.m, self.s = m, s

    def std(self, sigma):
        return torch.sqrt((1 - sigma) ** 2 * self.s**2 + sigma**2)

    def velocity(self, x, sigma, rows=None):
        sigma = per_sample(sigma, x)
        var = self.std(sigma) ** 2
        return (sigma - (1 - sigma) * self.s**2) * (x - (1 - sigma) * self.m) / var - self.m

    def flow(self, x, sigma, sigma_to):
        """Exact ODE solution from σ to σ_to."""
        sigma, sigma_to = per_sample(sigma, x), per_sample(sigma_to, x)
        z = (x - (1 - sigma) * self.m) / self.std(sigma)
        return (1 - sigma_to) * self.m + self.std(sigma_to) * z


def test_target_is_exact_for_straight_trajectories():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(5, *SHAPE, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.99, 0.8, 0.5, 0.3, 0.2], dtype=torch.float64)
    d1 = torch.tensor([0.3, 0.1, 0.2, 0.05, 0.1], dtype=torch.float64)
    d2 = torch.tensor([0.5, 0.2, 0.1, 0.05, 0.1], dtype=torch.float64)
    x = (1 - per_sample(sigma, noise)) * c + per_sample(sigma, noise) * noise
    v = point_mass_velocity(c)
    target = scfm_target(x, sigma, d1, d2, v, v, torch.arange(5))
    assert target.dtype == torch.float64 and not target.requires_grad
    torch.testing.assert_close(target, noise - c, rtol=0, atol=1e-12)


def test_target_matches_two_euler_steps_and_converges_on_a_curved_flow():
    flow = GaussianFlow(m=torch.tensor([[1.5, -2.0]], dtype=torch.float64), s=0.3)
    g = torch.Generator().manual_seed(1)
    x = flow.flow(torch.randn(4, *SHAPE, generator=g, dtype=torch.float64), torch.ones(4), torch.full((4,), 0.7))
    sigma = torch.full((4,), 0.7, dtype=torch.float64)
    rows = torch.arange(4)
    errors_two_step, errors_one_step = [], []
    for h in (0.08, 0.04, 0.02, 0.01):
        d = torch.full((4,), h, dtype=torch.float64)
        target = scfm_target(x, sigma, d, d, flow.velocity, flow.velocity, rows)
        # Independent form: position after two Euler half-steps, divided by the coarse step.
        x_mid = x - h * flow.velocity(x, sigma)
        x_end = x_mid - h * flow.velocity(x_mid, sigma - h)
        torch.testing.assert_close(target, (x - x_end) / (2 * h), rtol=1e-12, atol=1e-12)
        exact = (x - flow.flow(x, sigma, sigma - 2 * h)) / (2 * h)
        errors_two_step.append((target - exact).abs().max().item())
        errors_one_step.append((flow.velocity(x, sigma) - exact).abs().max().item())
    # O(d) convergence to the exact average velocity ...
    for coarse, fine in zip(errors_two_step, errors_two_step[1:]):
        assert 1.7 < coarse / fine < 2.3
    # ... with half the error of a single Euler step (two half-steps halve the local error).
    assert 0.4 < errors_two_step[-1] / errors_one_step[-1] < 0.6
    assert errors_two_step[-1] > 1e-6  # the flow is really curved


def make_steps(sources, sigma=None):
    n = len(sources)
    sigma = torch.linspace(0.9, 0.3, n) if sigma is None else sigma
    return StepSample(
        sigma=sigma,
        d1=torch.full((n,), 0.1),
        d2=torch.full((n,), 0.05),
        source=torch.tensor([int(s) for s in sources]),
        grid_size=torch.full((n,), 8),
        shift=torch.full((n,), 3.0),
    )


class Recorder:
    def __init__(self, name, log, fn):
        self.name, self.log, self.fn = name, log, fn

    def __call__(self, x, sigma, rows):
        self.log.append((self.name, rows.tolist(), torch.is_grad_enabled()))
        assert x.shape[0] == sigma.shape[0] == rows.shape[0]
        return self.fn(x, sigma, rows)


def test_targets_before_student_one_slow_pass_and_rows_per_part():
    T, S, F = TargetSource.TEACHER, TargetSource.SELF, TargetSource.FLOW_MATCHING
    steps = make_steps([S, T, F, S, T, T])
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(6, *SHAPE, generator=g), torch.randn(6, *SHAPE, generator=g)
    log = []
    v = point_mass_velocity(torch.zeros(1, *SHAPE))
    fns = {name: Recorder(name, log, v) for name in ("student", "teacher", "fast_ema", "slow_ema")}
    scfm_loss(**fns, x0=x0, noise=noise, steps=steps)
    # First half-steps per source on their own rows, ONE slow-EMA pass for all SCFM rows, the student last.
    assert log == [
        ("teacher", [1, 4, 5], False),
        ("fast_ema", [0, 3], False),
        ("slow_ema", [0, 1, 3, 4, 5], False),
        ("student", [0, 1, 2, 3, 4, 5], True),
    ]


def test_loss_is_plain_mse_with_student_gradient_and_per_part_means():
    config = GridSamplerConfig(teacher_ratio=0.4, flow_matching_ratio=0.2, dynamic_shift_prob=0.0)
    steps = sample_grid_steps(32, config, generator=torch.Generator().manual_seed(3))
    assert steps.is_teacher.any() and steps.is_self.any() and steps.is_flow_matching.any()
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(32, *SHAPE, generator=g), torch.randn(32, *SHAPE, generator=g)
    weight = torch.tensor(0.5, requires_grad=True)
    student = lambda x, sigma, rows: weight * x  # noqa: E731
    teacher = lambda x, sigma, rows: x - 1  # noqa: E731
    fast = lambda x, sigma, rows: 2 * x  # noqa: E731
    slow = lambda x, sigma, rows: -x  # noqa: E731
    out = scfm_loss(student=student, teacher=teacher, fast_ema=fast, slow_ema=slow, x0=x0, noise=noise, steps=steps)

    sigma = per_sample(steps.sigma, x0)
    x_sigma = (1 - sigma) * x0 + sigma * noise
    torch.testing.assert_close(out.x_sigma, x_sigma)
    fm = steps.is_flow_matching
    assert torch.equal(out.target[fm], noise[fm] - x0[fm])
    t = steps.is_teacher
    expected_teacher = scfm_target(
        x_sigma[t], steps.sigma[t], steps.d1[t], steps.d2[t], teacher, slow, t.nonzero()[:, 0]
    )
    torch.testing.assert_close(out.target[t], expected_teacher)
    s = steps.is_self
    expected_self = scfm_target(x_sigma[s], steps.sigma[s], steps.d1[s], steps.d2[s], fast, slow, s.nonzero()[:, 0])
    torch.testing.assert_close(out.target[s], expected_self)

    assert not out.target.requires_grad and not out.loss_per_sample.requires_grad
    torch.testing.assert_close(out.loss, ((0.5 * x_sigma - out.target) ** 2).mean())
    per_sample_loss = ((0.5 * x_sigma - out.target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out.loss_per_sample, per_sample_loss)
    torch.testing.assert_close(out.loss_teacher, per_sample_loss[t].mean())
    torch.testing.assert_close(out.loss_self, per_sample_loss[s].mean())
    torch.testing.assert_close(out.loss_flow_matching, per_sample_loss[fm].mean())
    out.loss.backward()
    assert weight.grad is not None and weight.grad.abs() > 0


def test_empty_parts_are_nan_and_their_callables_are_skipped():
    steps = make_steps([TargetSource.TEACHER] * 4)
    x0, noise = torch.zeros(4, *SHAPE), torch.ones(4, *SHAPE)

    def never(x, sigma, rows):
        raise AssertionError("the fast EMA has no rows and must not be called")

    v = point_mass_velocity(torch.zeros(1, *SHAPE))
    out = scfm_loss(student=v, teacher=v, fast_ema=never, slow_ema=v, x0=x0, noise=noise, steps=steps)
    assert math.isnan(out.loss_self) and math.isnan(out.loss_flow_matching)
    assert out.loss_teacher == out.loss == 0


def test_exact_velocity_everywhere_gives_zero_loss_in_float64():
    config = GridSamplerConfig(teacher_ratio=0.4, flow_matching_ratio=0.2, dynamic_shift_prob=0.0)
    steps = sample_grid_steps(16, config, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    c = torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    x0, noise = c.expand(16, *SHAPE), torch.randn(16, *SHAPE, generator=g, dtype=torch.float64)
    v = point_mass_velocity(c)
    out = scfm_loss(student=v, teacher=v, fast_ema=v, slow_ema=v, x0=x0, noise=noise, steps=steps)
    assert out.target.dtype == torch.float64
    assert out.loss.item() < 1e-20


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        v = point_mass_velocity(0.0)
        scfm_loss(
            student=v, teacher=v, fast_ema=v, slow_ema=v, x0=torch.zeros(3, 2), noise=torch.zeros(3, 2),
            steps=make_steps([TargetSource.SELF] * 4),
        )  # fmt: skip


def test_loss_by_sigma_bins():
    sigma = torch.tensor([0.1, 0.3, 0.35, 1.0])
    loss = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert loss_by_sigma_bins(sigma, loss) == {
        "loss_sigma_0.00-0.25": 1.0,
        "loss_sigma_0.25-0.50": 3.0,
        "loss_sigma_0.75-1.00": 8.0,
    }
    assert loss_by_sigma_bins(sigma, loss, num_bins=1) == {"loss_sigma_0.00-1.00": 3.75}
