from compile import structure_signature
from compile.models import build_preset


def test_same_structure_other_weights_same_signature():
    assert structure_signature(build_preset("tiny", seed=0)) == structure_signature(build_preset("tiny", seed=3))


def test_sd1_vs_sd2_style_head_count_differs_although_shapes_match():
    sd1_like = build_preset("tiny", attention_head_dim=8)
    sd2_like = build_preset("tiny", attention_head_dim=4)
    shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(sd1_like) == shapes(sd2_like)
    assert structure_signature(sd1_like).digest != structure_signature(sd2_like).digest


def test_linear_vs_conv_projection_differs():
    assert structure_signature(build_preset("tiny")) != structure_signature(
        build_preset("tiny", use_linear_projection=True)
    )


def test_inpainting_channels_and_dtype_differ():
    base = structure_signature(build_preset("tiny"))
    assert base != structure_signature(build_preset("tiny", in_channels=9))
    assert base != structure_signature(build_preset("tiny").half())


def test_a1111_lora_bookkeeping_on_modules_is_not_structure():
    """A1111's Lora extension stores the applied networks and backups on each layer; a UNet that ran a LoRA is
    still the same structure (else every LoRA job would get a new graph entry)."""
    import torch

    unet = build_preset("tiny")
    before = structure_signature(unet)
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear):
            module.network_current_names = (("tiny_lora", 1.0, 1.0, None),)
            module.network_weights_backup = module.weight.detach().clone()
            module.network_bias_backup = None
    assert structure_signature(unet) == before
