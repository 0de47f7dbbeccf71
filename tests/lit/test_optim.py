"""captioner.lit.optim: fused Adam where Lightning allows it, the same update as the loop."""

import re
from types import SimpleNamespace

import torch

from captioner.lit.captioning import CaptioningModule
from captioner.lit.optim import adam, rmsprop
from tests.lit.test_captioning import model_config


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=g)),
            torch.nn.Parameter(torch.randn(3, generator=g))]


def test_fused_adam_takes_the_loops_steps():
    """Five steps with weight decay and two parameter groups: the fused kernel and PyTorch's
    per-tensor loop agree to float rounding; the first step moves each entry by lr (Adam's
    bias-corrected first step is lr * sign(g) for |g| >> eps)."""
    fused_params, loop_params = _params(0), _params(0)
    fused = adam([{"params": fused_params[:1]}, {"params": fused_params[1:], "lr": 0.05}],
                 lr=0.1, weight_decay=0.01)
    loop = adam([{"params": loop_params[:1]}, {"params": loop_params[1:], "lr": 0.05}],
                lr=0.1, weight_decay=0.01, fused=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in fused_params]
        before = [p.detach().clone() for p in fused_params]
        for params, opt in ((fused_params, fused), (loop_params, loop)):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
        for p, q in zip(fused_params, loop_params):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        if step == 0:
            for p, b, lr in zip(fused_params, before, (0.1, 0.05)):
                torch.testing.assert_close((p - b).abs(), torch.full_like(p, lr), rtol=1e-4,
                                           atol=0)


def test_no_fused_kernel_under_a_gradient_scaler():
    scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    assert not adam(_params(0), lr=0.1, trainer=scaled).defaults["fused"]
    unscaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))
    assert adam(_params(0), lr=0.1, trainer=unscaled).defaults["fused"]


def test_the_captioning_module_trains_with_fused_adam_unless_told_not_to():
    module = CaptioningModule.from_config(model_config(20))
    assert module.configure_optimizers().defaults["fused"]
    loop = CaptioningModule.from_config({**model_config(20), "fused_adam": False})
    assert not loop.configure_optimizers().defaults["fused"]


def test_rmsprop_is_the_authors_update():
    """Three steps of :func:`rmsprop` against arctic-captions' ``optimizers.rmsprop`` written
    out (Graves 2013): r_g = .95 r_g + .05 g, r_g2 = .95 r_g2 + .05 g^2,
    u = .9 u - lr g / sqrt(r_g2 - r_g^2 + 1e-4), p += u. PyTorch adds its eps after the root
    instead: equal to ~1e-4 relative for gradients of order one."""
    (p,) = _params(2)[:1]
    opt = rmsprop([p], lr=1e-2)
    ref = p.detach().clone().double()
    r_g, r_g2, u = (torch.zeros_like(ref) for _ in range(3))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        grad = torch.randn(p.shape, generator=g) + 2.0  # order one, away from zero
        p.grad = grad.clone()
        opt.step()
        grad = grad.double()
        r_g, r_g2 = 0.95 * r_g + 0.05 * grad, 0.95 * r_g2 + 0.05 * grad**2
        u = 0.9 * u - 1e-2 * grad / torch.sqrt(r_g2 - r_g**2 + 1e-4)
        ref = ref + u
        torch.testing.assert_close(p.detach().double(), ref, rtol=2e-3, atol=2e-4)


def test_module_builds_the_chosen_optimizer():
    module = CaptioningModule.from_config({**model_config(11, lr=1e-4), "optimizer": "rmsprop"})
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.RMSprop)
    assert opt.defaults["centered"] and opt.defaults["momentum"] == 0.9
    assert opt.defaults["alpha"] == 0.95 and opt.param_groups[0]["lr"] == 1e-4


def test_param_groups_backbone_at_encoder_lr_stages_and_decoder_at_lr():
    """A backbone trained from scratch (``freeze: false``) trains at ``encoder_lr``, every
    parameter exactly once; an encoder stage (here a Non-local block) trains at ``lr``."""
    config = model_config(20, lr=2e-3)
    config["encoder"]["init_args"]["stages"] = [
        {"class_path": "captioner.encoders.non_local.NonLocalBlock",
         "init_args": {"where": "output"}}]
    module = CaptioningModule.from_config({**config, "encoder_lr": 3e-4})
    groups = module.configure_optimizers().param_groups
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert set(by_lr) == {2e-3, 3e-4}
    body = {id(p) for p in module.encoder.body.parameters()}
    assert body and by_lr[3e-4] == body
    stage = {id(p) for p in module.encoder.stages.parameters()}
    decoder = {id(p) for p in module.decoder.parameters()}
    assert stage and stage | decoder <= by_lr[2e-3]
    every = [id(p) for g in groups for p in g["params"]]
    assert len(every) == len(set(every)) == sum(1 for _ in module.parameters())


def test_hard_num_samples_below_one_is_refused():
    import pytest

    with pytest.raises(ValueError, match="hard_num_samples must be >= 1, got 0"):
        CaptioningModule.from_config({**model_config(20), "hard_num_samples": 0})


def test_out_of_range_module_options_are_refused_naming_the_option():
    """``lr: -1`` failed in Adam's constructor with a traceback, after the data was read."""
    import pytest

    from captioner.config import ConfigError

    for option, value, says in [("lr", -1.0, "lr must be >= 0, got -1.0 (model.init_args.lr)"),
                                ("min_length", -1, "min_length must be >= 0"),
                                ("beam_size", 0, "beam_size must be >= 1, got 0"),
                                ("max_length", 0, "max_length must be >= 1"),
                                ("weight_decay", -0.1, "weight_decay must be >= 0")]:
        with pytest.raises(ConfigError, match=re.escape(f"CaptioningModule: {says}")):
            CaptioningModule.from_config({**model_config(20), option: value})
    with pytest.raises(ConfigError, match=r"min_length \(6\) must not exceed max_length \(5\)"):
        CaptioningModule.from_config({**model_config(20), "min_length": 6, "max_length": 5})
    CaptioningModule.from_config({**model_config(20), "lr": 0.0})  # frozen: allowed
    CaptioningModule.from_config({**model_config(20), "min_length": 0})  # as 1
    # the plateau scheduler's options are checked where it is used
    CaptioningModule.from_config({**model_config(20), "plateau_factor": 1.5})
    with pytest.raises(ConfigError, match=re.escape("plateau_factor must be in (0, 1), got 1.5")):
        CaptioningModule.from_config({**model_config(20), "plateau_factor": 1.5,
                                      "lr_scheduler": "plateau"})
