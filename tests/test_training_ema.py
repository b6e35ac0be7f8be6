"""The dual LoRA EMA on a tiny real Flux transformer (no mocks of diffusers or peft)."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig

from scfm_diffusers.training.ema import DualLoraEMA, lora_parameters

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()


def add_student(model: FluxTransformer2DModel) -> FluxTransformer2DModel:
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    return model


def inputs(seed: int = 0, batch: int = 2, seq: int = 8, txt: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, seq, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, txt, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": torch.randn(seq, 3, generator=g),
        "txt_ids": torch.zeros(txt, 3),
        "guidance": None,
    }


@torch.no_grad()
def forward(model, x=None):
    return model(**(x or inputs()), return_dict=False)[0]


@torch.no_grad()
def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params.values():
        p.add_(0.1 * torch.randn(p.shape, generator=g))


def assert_trainable_state(ema: DualLoraEMA) -> None:
    model = ema.transformer
    student = lora_parameters(model, "default")
    assert all(p.requires_grad for p in student.values())
    for name in ("ema_fast", "ema_slow"):
        assert not any(p.requires_grad for p in lora_parameters(model, name).values())
        assert all(p.dtype == torch.float32 for p in lora_parameters(model, name).values())
    assert model.active_adapters() == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


@pytest.fixture
def setup():
    base = tiny_flux()
    base_out = forward(base)
    ema = DualLoraEMA(add_student(base), fast_decay=0.9, slow_decay=0.99)
    return ema, base_out


def test_emas_start_as_student_which_starts_as_teacher(setup):
    ema, base_out = setup
    model = ema.transformer
    assert set(model.peft_config) == {"default", "ema_fast", "ema_slow"}
    assert_trainable_state(ema)
    student = lora_parameters(model, "default")
    for name in ("ema_fast", "ema_slow"):
        for key, p in lora_parameters(model, name).items():
            assert torch.equal(p, student[key])
    # Gaussian init has B = 0: every adapter is the teacher (up to float rounding of a zero LoRA term).
    for which in ("fast", "slow"):
        with ema.use(which):
            torch.testing.assert_close(forward(model), base_out)


def test_teacher_is_exactly_the_base_model(setup):
    ema, base_out = setup
    model = ema.transformer
    perturb(lora_parameters(model, "default"), seed=1)
    ema.update()
    assert not torch.allclose(forward(model), base_out)
    with ema.teacher() as m:
        assert m is model
        assert torch.equal(forward(model), base_out)
        assert_student_grad_kept(ema)
    model.disable_adapters()
    assert torch.equal(forward(model), base_out)
    model.enable_adapters()
    assert_trainable_state(ema)


def assert_student_grad_kept(ema: DualLoraEMA) -> None:
    assert all(p.requires_grad for p in lora_parameters(ema.transformer, "default").values())
    for name in ("ema_fast", "ema_slow"):
        assert not any(p.requires_grad for p in lora_parameters(ema.transformer, name).values())


def test_contexts_select_each_adapter_and_restore_the_student(setup):
    ema, _ = setup
    model = ema.transformer
    perturb(lora_parameters(model, "default"), seed=1)
    student_out = forward(model)
    perturb(lora_parameters(model, "ema_fast"), seed=2)
    perturb(lora_parameters(model, "ema_slow"), seed=3)
    outs = {}
    for which in ("fast", "slow"):
        with ema.use(which):
            assert model.active_adapters() == [f"ema_{which}"]
            assert_student_grad_kept(ema)
            outs[which] = forward(model)
        assert_trainable_state(ema)
        assert torch.equal(forward(model), student_out)
    with ema.use("student"):
        assert torch.equal(forward(model), student_out)
    # Reference: peft's own adapter switch gives the same outputs.
    for which in ("fast", "slow"):
        model.set_adapter(f"ema_{which}")
        assert torch.equal(forward(model), outs[which])
    model.set_adapter("default")
    assert not torch.allclose(outs["fast"], outs["slow"])
    assert not torch.allclose(outs["fast"], student_out)


@pytest.mark.parametrize("which", ["teacher", "fast", "slow"])
def test_context_restores_the_student_when_the_body_raises(setup, which):
    ema, _ = setup
    with pytest.raises(RuntimeError, match="boom"), ema.use(which):
        raise RuntimeError("boom")
    assert_trainable_state(ema)
    assert not any(layer.disable_adapters for layer in ema._layers)


def test_update_matches_the_formula_and_student_gradient_flows(setup):
    ema, _ = setup
    model = ema.transformer
    student = lora_parameters(model, "default")
    perturb(student, seed=1)
    fast_before = {k: p.detach().clone() for k, p in lora_parameters(model, "ema_fast").items()}
    slow_before = {k: p.detach().clone() for k, p in lora_parameters(model, "ema_slow").items()}
    ema.update()
    for key, p in lora_parameters(model, "ema_fast").items():
        torch.testing.assert_close(p, fast_before[key] + 0.1 * (student[key] - fast_before[key]))
    for key, p in lora_parameters(model, "ema_slow").items():
        torch.testing.assert_close(p, slow_before[key] + 0.01 * (student[key] - slow_before[key]))
    assert_trainable_state(ema)
    # A student pass after target passes still trains the student only.
    with ema.teacher():
        forward(model)
    model(**inputs(), return_dict=False)[0].square().mean().backward()
    assert all(p.grad is not None for p in student.values())
    assert all(p.grad is None for n, p in model.named_parameters() if ".default." not in n)


def test_decay_zero_copies_exactly_and_restart_resets():
    model = add_student(tiny_flux())
    ema = DualLoraEMA(model, fast_decay=0.0, slow_decay=1.0)
    student = lora_parameters(model, "default")
    slow_before = {k: p.detach().clone() for k, p in lora_parameters(model, "ema_slow").items()}
    perturb(student, seed=4)
    ema.update()
    for key, p in lora_parameters(model, "ema_fast").items():
        assert torch.equal(p, student[key])
    for key, p in lora_parameters(model, "ema_slow").items():
        assert torch.equal(p, slow_before[key])
    ema.restart()
    for key, p in lora_parameters(model, "ema_slow").items():
        assert torch.equal(p, student[key])


def test_state_dict_round_trip_into_a_fresh_model(setup):
    ema, _ = setup
    model = ema.transformer
    perturb(lora_parameters(model, "default"), seed=1)
    ema.update()
    perturb(lora_parameters(model, "default"), seed=2)
    ema.update()
    state = ema.state_dict()
    assert all(k.startswith(("fast.", "slow.")) and v.device.type == "cpu" for k, v in state.items())
    assert len(state) == 2 * len(lora_parameters(model, "default"))
    outs = {}
    for which in ("fast", "slow"):
        with ema.use(which):
            outs[which] = forward(model)

    fresh_model = add_student(tiny_flux())
    fresh = DualLoraEMA(fresh_model, fast_decay=0.9, slow_decay=0.99)
    fresh.load_state_dict(state)
    for which in ("fast", "slow"):
        with fresh.use(which):
            assert torch.equal(forward(fresh_model), outs[which])
    assert_trainable_state(fresh)

    with pytest.raises(KeyError, match="1 missing"):
        fresh.load_state_dict({k: v for k, v in list(state.items())[1:]})
    with pytest.raises(KeyError, match="1 unexpected"):
        fresh.load_state_dict({**state, "fast.bogus": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(ValueError, match="Shape mismatch"):
        fresh.load_state_dict({**state, key: torch.zeros(1)})


def test_adapter_state_dict_is_peft_format(setup):
    ema, _ = setup
    perturb(lora_parameters(ema.transformer, "default"), seed=1)
    ema.update()
    fast = ema.adapter_state_dict("fast")
    student = ema.adapter_state_dict("student")
    assert fast.keys() == student.keys()
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in fast
    torch.testing.assert_close(
        fast["transformer_blocks.0.attn.to_q.lora_B.weight"],
        lora_parameters(ema.transformer, "ema_fast")["transformer_blocks.0.attn.to_q.lora_B.weight"],
    )
    with pytest.raises(ValueError, match="Expected one of"):
        ema.adapter_state_dict("teacher")


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="no adapter 'default'"):
        DualLoraEMA(tiny_flux())
    model = add_student(tiny_flux())
    with pytest.raises(ValueError, match="must differ"):
        DualLoraEMA(model, fast_name="default")
    with pytest.raises(ValueError, match="fast_decay"):
        DualLoraEMA(model, fast_decay=1.5)
    DualLoraEMA(model)
    with pytest.raises(ValueError, match="already has an adapter"):
        DualLoraEMA(model)


def test_accepts_a_ddp_style_wrapper():
    model = add_student(tiny_flux())
    ema = DualLoraEMA(torch.nn.DataParallel(model))
    assert ema.transformer is model
    assert not any(k.startswith("module.") for k in ema.state_dict())


def test_wrap_runs_the_velocity_in_the_context_and_restores_the_student(setup):
    ema, base_out = setup
    model = ema.transformer
    perturb(lora_parameters(model, "default"), seed=1)
    perturb(lora_parameters(model, "ema_slow"), seed=3)
    student_out = forward(model)
    with ema.slow():
        slow_out = forward(model)
    assert torch.equal(ema.wrap("teacher", forward)(model), base_out)
    assert torch.equal(ema.wrap("slow", forward)(model), slow_out)
    assert torch.equal(forward(model), student_out)
    assert_trainable_state(ema)
    with pytest.raises(ValueError, match="Expected one of"):
        ema.wrap("medium", forward)
