"""Checks shared by the integration tests of both hosts (A1111's webui and SD.Next): requests with and without
the script, the job's OneDiff info, and images compared with the eager image of the same request."""

import json

import numpy as np

from .webui_server import WebUI

SCRIPT = "onediff_diffusion_model"
# The compiled graph is not bit-identical to eager (fused kernels round differently); after the VAE and the
# uint8 conversion that must stay within a couple of levels.
MAX_LEVEL_DIFF = 3
MAX_MEAN_DIFF = 0.25


def with_checkpoint(request, name):
    return dict(request, override_settings={"sd_model_checkpoint": name})


def accelerated(request, args=(False,)):
    return dict(request, script_name=SCRIPT, script_args=list(args))


def onediff_info(answer):
    return json.loads(answer["info"])["extra_generation_params"].get("OneDiff", "")


def assert_same_image(eager_answer, compiled_answer):
    eager, compiled = WebUI.image(eager_answer), WebUI.image(compiled_answer)
    assert eager.shape == compiled.shape
    difference = np.abs(eager - compiled)
    assert difference.max() <= MAX_LEVEL_DIFF and difference.mean() <= MAX_MEAN_DIFF, (
        f"compiled image differs from eager: max {difference.max()}, mean {difference.mean():.3f}"
    )
    assert eager.std() > 5, "the tiny model produced a flat image; the comparison would prove nothing"


# A LoRA comparison on any x86 CPU: float reordering in compiled kernels shows more in the strong fixture LoRAs'
# images (max 3, mean 0.28 levels on an AVX2-only EPYC), so the compiled-vs-eager difference is bounded by a
# fraction of what the LoRA itself changes: a compiled UNet without the LoRA misses it by the whole effect.
LORA_MAX_SHARE_OF_EFFECT = 0.05
LORA_MAX_LEVEL_DIFF = 8


def assert_same_lora_image(eager_answer, compiled_answer, eager_without_lora_answer):
    eager, compiled = WebUI.image(eager_answer), WebUI.image(compiled_answer)
    effect = np.abs(eager - WebUI.image(eager_without_lora_answer)).mean()
    difference = np.abs(eager - compiled)
    assert effect > 2, f"the LoRA changed the image by {effect:.2f} levels on average: nothing to compare with"
    assert difference.mean() <= LORA_MAX_SHARE_OF_EFFECT * effect and difference.max() <= LORA_MAX_LEVEL_DIFF, (
        f"compiled LoRA image differs from eager: mean {difference.mean():.3f} (LoRA effect {effect:.2f}), "
        f"max {difference.max()}"
    )


def assert_accelerated(answer):
    info = onediff_info(answer)
    assert info.startswith("inductor"), f"the job ran eagerly: {info!r}"


def psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12))


# int8 (weights and activations) changes the image a little; the tests print the measured PSNRs.
INT8_MIN_PSNR_DB = 25.0
# "The LoRA changes the int8 image like the float one": the int8+LoRA image must be clearly closer to the
# float+LoRA image than to the float image without LoRA.
LORA_MARGIN_DB = 3.0
