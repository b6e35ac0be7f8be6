"""FlowMatchSCFMScheduler: grids against hand computation, Euler step, config round trips, stock pipelines."""

import numpy as np
import pytest
import torch
from conftest import generate
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from scfm_diffusers import FlowMatchSCFMScheduler
from scfm_diffusers.sigmas import DEFAULT_MAX_SIGMA, resolution_mu

# The method doc's table of shifted grids at s = 3.
METHOD_GRIDS = {
    3: [1, 0.857, 0.6, 0],
    4: [1, 0.9, 0.75, 0.5, 0],
    8: [1, 0.955, 0.9, 0.833, 0.75, 0.643, 0.5, 0.3, 0],
}


@pytest.mark.parametrize("steps", sorted(METHOD_GRIDS))
def test_grid_matches_method_table(steps):
    scheduler = FlowMatchSCFMScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), METHOD_GRIDS[steps], atol=5e-4)
    assert scheduler.sigmas[0].item() == pytest.approx(DEFAULT_MAX_SIGMA)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("shift", [1.0, 3.25])
def test_grid_hand_computed(steps, shift):
    scheduler = FlowMatchSCFMScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    u = [1 - i / steps for i in range(steps + 1)]
    expected = [min(shift * x / (1 + (shift - 1) * x), DEFAULT_MAX_SIGMA) for x in u]
    np.testing.assert_allclose(scheduler.sigmas.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert len(scheduler.timesteps) == steps
    assert torch.all(scheduler.sigmas[1:] < scheduler.sigmas[:-1])


def test_dynamic_shift_uses_mu():
    scheduler = FlowMatchSCFMScheduler(use_dynamic_shifting=True)
    mu = resolution_mu(1024)
    scheduler.set_timesteps(4, mu=mu)
    u = np.array([1.0, 0.75, 0.5, 0.25])
    expected = np.exp(mu) / (np.exp(mu) + (1 / u - 1))
    expected[0] = min(expected[0], DEFAULT_MAX_SIGMA)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps(4)


def test_sigmas_from_flux_pipeline_equal_own_grid():
    # FluxPipeline passes sigmas = linspace(1, 1/N, N) (and mu): the SCFM grid must not change.
    a, b = FlowMatchSCFMScheduler(shift=3.25), FlowMatchSCFMScheduler(shift=3.25)
    a.set_timesteps(5)
    b.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=0.7)
    torch.testing.assert_close(a.sigmas, b.sigmas)


def test_euler_step_and_zero_length_step():
    scheduler = FlowMatchSCFMScheduler(shift=3.0)
    scheduler.set_timesteps(3)
    sample, velocity = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    sigmas = scheduler.sigmas.tolist()
    out = scheduler.step(velocity, scheduler.timesteps[0], sample).prev_sample
    torch.testing.assert_close(out, sample + (sigmas[1] - sigmas[0]) * velocity)
    # A zero-length step (σ' = σ) returns the input unchanged.
    scheduler.set_timesteps(sigmas=[0.5, 0.5])
    scheduler.set_begin_index(0)  # duplicate timesteps: start at the first one
    out = scheduler.step(velocity, scheduler.timesteps[0], sample).prev_sample
    torch.testing.assert_close(out, sample)


def test_full_euler_integration_of_linear_flow_is_exact():
    # For x0 a point mass, v(x, σ) = (x − x0)/σ is constant along straight paths: Euler is exact on any grid.
    x0, noise = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    scheduler = FlowMatchSCFMScheduler(shift=3.0, max_sigma=1.0)
    scheduler.set_timesteps(3)
    x = noise.float()
    for t in scheduler.timesteps:
        v = (noise - x0).float()
        x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(x, x0.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_step_count(bad):
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        FlowMatchSCFMScheduler().set_timesteps(bad)


def test_bad_config():
    with pytest.raises(ValueError, match="shift"):
        FlowMatchSCFMScheduler(shift=0)
    with pytest.raises(ValueError, match="max_sigma"):
        FlowMatchSCFMScheduler(max_sigma=1.5)


def test_from_stock_configs_and_save_load(tmp_path):
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256)
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    from_flux = FlowMatchSCFMScheduler.from_config(flux.config)
    assert from_flux.config.use_dynamic_shifting is True  # the stock keys it knows survive
    fixed = FlowMatchSCFMScheduler.from_config(flux.config, shift=3.25, use_dynamic_shifting=False)
    assert fixed.config.shift == 3.25 and not fixed.config.use_dynamic_shifting
    from_sd3 = FlowMatchSCFMScheduler.from_config(sd3.config)
    from_sd3.set_timesteps(3)
    np.testing.assert_allclose(from_sd3.sigmas.numpy(), METHOD_GRIDS[3], atol=5e-4)

    fixed.save_pretrained(tmp_path)
    loaded = FlowMatchSCFMScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(fixed.config)
    loaded.set_timesteps(4)
    fixed.set_timesteps(4)
    torch.testing.assert_close(loaded.sigmas, fixed.sigmas)
    # And back to the stock class (diffusers' scheduler swapping goes both ways).
    FlowMatchEulerDiscreteScheduler.from_config(loaded.config).set_timesteps(4)


@pytest.mark.parametrize("pipeline_class", [FluxPipeline, StableDiffusion3Pipeline])
def test_drop_in_stock_pipelines(saved_pipelines, pipeline_class):
    family = "flux" if pipeline_class is FluxPipeline else "sd3"
    pipe = pipeline_class.from_pretrained(saved_pipelines[family])
    pipe.scheduler = FlowMatchSCFMScheduler.from_config(pipe.scheduler.config, shift=3.0, use_dynamic_shifting=False)
    seen = []
    pipe(
        "a cat",
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="pt",
        callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or {},
    )
    np.testing.assert_allclose(np.array(seen) / 1000, METHOD_GRIDS[3][:-1], atol=5e-4)
    images = generate(pipe, num_inference_steps=3)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
