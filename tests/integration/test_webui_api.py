"""The extension in the real webui, through its HTTP API: every accelerated image is compared with the eager
image of the same request, and graph counts come from the status route (torch's own counters).

The tests share one webui and run in file order, so the compiled graphs they pay for (each is ~1 minute of CPU
cold) are few: the tiny UNet at 64x64, the same at hires fix's second size and at a 154-token context, and the
UNet with another head count, and one int8 graph. Checkpoint switches, img2img and LoRA compile nothing.
"""

import json
import re

import numpy as np
import pytest

from .api_checks import (
    INT8_MIN_PSNR_DB,
    LORA_MARGIN_DB,
    SCRIPT,
    accelerated,
    assert_accelerated,
    assert_same_image,
    assert_same_lora_image,
    onediff_info,
    psnr,
    with_checkpoint,
)
from .webui_server import WebUI

INT8_INFO = re.compile(r"\bint8-(dynamic|weight-only) quantized\b")  # the job's info names the scheme that ran
# A 64x64, 4-step request: fast on CPU, and enough steps for a compiled-vs-eager difference to show.
BASE = {"prompt": "a red cube on a table", "negative_prompt": "blurry", "seed": 1234, "steps": 4,
        "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5, "batch_size": 1}


def test_script_is_listed_for_txt2img_and_img2img(webui):
    status, scripts = webui.request("/sdapi/v1/scripts")
    assert status == 200
    assert SCRIPT in scripts["txt2img"]
    assert SCRIPT in scripts["img2img"]


def test_same_seed_with_and_without_the_script(webui):
    request = with_checkpoint(BASE, webui.checkpoints[0])
    eager = webui.post_ok("/sdapi/v1/txt2img", request)
    compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
    assert_accelerated(compiled)
    assert_same_image(eager, compiled)

    status = webui.status()
    assert status["compiles"] == 1
    assert len(status["graphs"]) == 1 and status["graphs"][0]["compile_s"] > 0
    assert status["last_job"]["accelerated"] is True

    again = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
    assert webui.status()["last_job"]["new_graphs"] == 0, "a repeated request compiled again"
    assert_same_image(eager, again)


def test_same_structure_checkpoint_reuses_the_graph(webui):
    base, same = webui.checkpoints[0], "tiny_same"
    before = webui.status()
    compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(with_checkpoint(BASE, same)))
    after = webui.status()
    assert_accelerated(compiled)
    assert json.loads(compiled["info"])["sd_model_name"] == same
    assert after["compiles"] == before["compiles"], "a checkpoint of the same structure compiled a new graph"
    assert after["dynamo_graphs_total"] == before["dynamo_graphs_total"]
    assert after["last_job"]["reused"] is True

    eager_same = webui.post_ok("/sdapi/v1/txt2img", with_checkpoint(BASE, same))
    assert_same_image(eager_same, compiled)
    eager_base = webui.post_ok("/sdapi/v1/txt2img", with_checkpoint(BASE, base))
    assert np.abs(WebUI.image(eager_base) - WebUI.image(compiled)).max() > 20, (
        "tiny_same and tiny_base give the same image: the test could not see stale weights"
    )

    back = webui.post_ok("/sdapi/v1/txt2img", accelerated(with_checkpoint(BASE, base)))
    assert_same_image(eager_base, back)
    assert webui.status()["compiles"] == before["compiles"]


def test_structurally_different_checkpoint_compiles_its_own_graph(webui):
    before = webui.status()
    request = with_checkpoint(BASE, "tiny_heads")
    compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
    after = webui.status()
    assert_accelerated(compiled)
    assert after["compiles"] == before["compiles"] + 1
    signatures = {graph["signature"] for graph in after["graphs"]}
    assert len(signatures) == 2, signatures
    assert_same_image(webui.post_ok("/sdapi/v1/txt2img", request), compiled)


def test_img2img(webui):
    source = webui.post_ok("/sdapi/v1/txt2img", with_checkpoint(BASE, webui.checkpoints[0]))["images"][0]
    request = with_checkpoint(
        {"init_images": [source], "prompt": "a blue sphere", "seed": 77, "steps": 4, "sampler_name": "Euler",
         "cfg_scale": 5, "denoising_strength": 0.6, "width": 64, "height": 64},
        webui.checkpoints[0],
    )
    compiled = webui.post_ok("/sdapi/v1/img2img", accelerated(request))
    assert_accelerated(compiled)
    assert webui.status()["last_job"]["new_graphs"] == 0, "img2img at a compiled size compiled again"
    assert_same_image(webui.post_ok("/sdapi/v1/img2img", request), compiled)


def test_hires_fix_two_sizes_in_one_job(webui):
    request = with_checkpoint(
        dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5,
             hr_second_pass_steps=2),
        webui.checkpoints[0],
    )
    compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
    assert_accelerated(compiled)
    first = webui.status()["last_job"]
    assert first["new_graphs"] == 1, f"the second size should add exactly one graph: {first}"
    assert_same_image(webui.post_ok("/sdapi/v1/txt2img", request), compiled)
    assert WebUI.image(compiled).shape == (96, 96, 3)

    webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
    assert webui.status()["last_job"]["new_graphs"] == 0, "both sizes should now be served by cached graphs"


def test_prompt_over_75_tokens(webui):
    long_prompt = ", ".join(["a red cube on a wooden table in the morning light"] * 9)  # > 75 tokens: 154 context
    request = with_checkpoint(dict(BASE, prompt=long_prompt), webui.checkpoints[0])
    compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
    assert_accelerated(compiled)
    assert_same_image(webui.post_ok("/sdapi/v1/txt2img", request), compiled)
    status = webui.status()
    assert status["recompile_limit_hits"] == [], status["recompile_limit_hits"]
    assert status["recompiles"] >= 2  # hires size and context length, counted by torch


def test_lora_reaches_the_compiled_unet_without_recompiling(webui):
    plain = with_checkpoint(BASE, webui.checkpoints[0])
    with_lora = dict(plain, prompt=BASE["prompt"] + " <lora:tiny_lora:1>")
    before = webui.status()
    compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(with_lora))
    after = webui.status()
    assert_accelerated(compiled)
    assert after["dynamo_graphs_total"] == before["dynamo_graphs_total"], "applying a LoRA recompiled"
    assert after["lora_applications"] > before["lora_applications"] and after["last_lora_fuse_ms"] >= 0
    eager_plain = webui.post_ok("/sdapi/v1/txt2img", plain)
    assert_same_lora_image(webui.post_ok("/sdapi/v1/txt2img", with_lora), compiled, eager_plain)
    without_lora = webui.post_ok("/sdapi/v1/txt2img", accelerated(plain))  # the LoRA must come off again
    assert_same_image(eager_plain, without_lora)
    assert webui.status()["dynamo_graphs_total"] == before["dynamo_graphs_total"]


@pytest.mark.parametrize("args", [[True], [{"0": True}], ["true"], [], [False, "ignored", 3]])
def test_tolerant_script_args_are_accepted(webui, args):
    answer = webui.post_ok("/sdapi/v1/txt2img", accelerated(with_checkpoint(BASE, webui.checkpoints[0]), args))
    info = onediff_info(answer)
    assert info.startswith("inductor"), info
    asked_for_int8 = bool(args) and args[0] in (True, {"0": True}, "true")
    assert bool(INT8_INFO.search(info)) == asked_for_int8, info


@pytest.mark.parametrize("args", [["maybe"], [[1]], [2]])
def test_bad_script_args_give_a_clear_error(webui, args):
    status, answer = webui.request("/sdapi/v1/txt2img", accelerated(with_checkpoint(BASE, webui.checkpoints[0]), args))
    assert status >= 400
    assert "onediff_diffusion_model: script_args[0]" in json.dumps(answer), answer


def test_script_field_runs_the_script(webui):
    """``"script"``, the form OneDiff's README gives, runs the script like ``script_name`` (the webui alone
    ignores it); ``script_args`` as an object is read like the list."""
    request = with_checkpoint(BASE, webui.checkpoints[0])
    by_name = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
    by_script = webui.post_ok("/sdapi/v1/txt2img", dict(request, script=SCRIPT.upper(), script_args=[]))
    assert_accelerated(by_script)
    assert np.array_equal(WebUI.image(by_name), WebUI.image(by_script))
    as_object = webui.post_ok("/sdapi/v1/txt2img", dict(request, script_name=SCRIPT, script_args={"0": True}))
    assert INT8_INFO.search(onediff_info(as_object)), onediff_info(as_object)
    source = by_name["images"][0]
    img2img = dict(request, init_images=[source], denoising_strength=0.5, script=SCRIPT, script_args=[False])
    assert_accelerated(webui.post_ok("/sdapi/v1/img2img", img2img))


def test_script_field_that_cannot_be_mapped_is_refused_clearly(webui):
    request = with_checkpoint(BASE, webui.checkpoints[0])
    status, answer = webui.request("/sdapi/v1/txt2img", dict(request, script="x/y/z plot"))
    assert status == 422 and 'send "script_name": "x/y/z plot"' in answer["detail"], answer
    status, answer = webui.request("/sdapi/v1/img2img", dict(request, script=SCRIPT, script_name="x/y/z plot"))
    assert status == 422 and "send only one of them" in answer["detail"], answer


def test_requests_without_the_script_field_reach_the_webui_unchanged(webui):
    import http.client

    # the webui's own validation error, not ours
    status, answer = webui.request("/sdapi/v1/txt2img", dict(BASE, steps="many"))
    assert status == 422 and "ApiFormError" not in json.dumps(answer), answer
    # a streamed (chunked) body is reassembled, and mapped
    body = json.dumps(dict(with_checkpoint(BASE, webui.checkpoints[0]), script=SCRIPT)).encode()
    host, port = webui.url.rsplit("/", 1)[-1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    connection.request("POST", "/sdapi/v1/txt2img", body=iter([body[:7], body[7:50], body[50:]]),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200, answer
    assert_accelerated(answer)


def compiled_calls(webui):
    """Calls of all compiled graphs so far (the status route counts every call that ran a graph)."""
    return sum(graph["calls"] for graph in webui.status()["graphs"])


def assert_refiner_steps_compiled(webui, base, refiner_checkpoint, info_says):
    """The refiner's steps run through the job's graph: as many compiled calls as the job without refiner, no
    new graph, the image equals the webui's eager image, with and without LoRA (the refiner gets the LoRA as
    the eager webui gives it), and the next job still runs compiled."""
    request = dict(base, refiner_checkpoint=refiner_checkpoint, refiner_switch_at=0.5)
    eager, no_refiner = (webui.post_ok("/sdapi/v1/txt2img", r) for r in (request, base))
    assert np.abs(WebUI.image(eager) - WebUI.image(no_refiner)).max() > 20, "the refiner changed nothing visible"
    calls = compiled_calls(webui)
    webui.post_ok("/sdapi/v1/txt2img", accelerated(base))
    calls_without_refiner = compiled_calls(webui) - calls
    before = webui.status()
    calls = compiled_calls(webui)
    compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
    info = onediff_info(compiled)
    assert_accelerated(compiled)
    assert re.search(info_says, info), info
    assert compiled_calls(webui) - calls == calls_without_refiner, f"the refiner's steps ran eagerly: {info}"
    assert webui.status()["dynamo_graphs_total"] == before["dynamo_graphs_total"], "the refiner compiled a graph"
    assert_same_image(eager, compiled)

    lora = {"prompt": BASE["prompt"] + " <lora:tiny_lora:0.5>"}
    eager_lora = webui.post_ok("/sdapi/v1/txt2img", dict(request, **lora))
    compiled_lora = webui.post_ok("/sdapi/v1/txt2img", accelerated(dict(request, **lora)))
    assert re.search(info_says, onediff_info(compiled_lora)), onediff_info(compiled_lora)
    assert_same_lora_image(eager_lora, compiled_lora, eager)

    after = webui.post_ok("/sdapi/v1/txt2img", accelerated(base))
    assert_accelerated(after)
    assert_same_image(no_refiner, after)
    status = webui.status()
    assert status["compiled_call_failures"] == 0 and status["dynamo_graphs_total"] == before["dynamo_graphs_total"]


def test_refiner_of_another_config_runs_on_the_jobs_graph(webui):
    """The webui switches to the refiner in the middle of sampling. tiny_same has a yaml of its own, so the webui
    loads it as another model object and moves the base model to the ``meta`` device while its UNet is
    swapped: the job follows the switch and runs the refiner's steps on the same graph with tiny_same's
    weights bound, and the graph's weights survive the base model's trip to ``meta``."""
    assert_refiner_steps_compiled(webui, with_checkpoint(BASE, webui.checkpoints[0]), "tiny_same",
                                  r"refiner tiny_same( \[\w+\])?: compiled, reused")


def test_refiner_of_the_same_config_is_loaded_into_the_jobs_graph(webui):
    """tiny_pair.ckpt shares tiny_pair.safetensors' yaml, so the webui loads it into the running model object
    (``load_state_dict`` through the job's stand-in UNet, as for two SD1.5 fine-tunes without a yaml): its
    weights must reach the graph for the refiner's steps."""
    assert_refiner_steps_compiled(webui, with_checkpoint(BASE, "tiny_pair.safetensors"), "tiny_pair.ckpt",
                                  r"refiner tiny_pair( \[\w+\])?: compiled, loaded into graph")


def test_several_loaded_checkpoints_share_one_graph_without_mixing_weights(webui):
    """sd_checkpoints_limit 2 keeps tiny_base loaded beside tiny_same. Both use one graph (its storage holds
    the weights of whichever ran last), and switching back must give each checkpoint its own image."""
    base, same = webui.checkpoints[0], "tiny_same"
    assert webui.request("/sdapi/v1/options", {"sd_checkpoints_limit": 2})[0] == 200
    try:
        eager_base = webui.post_ok("/sdapi/v1/txt2img", with_checkpoint(BASE, base))
        eager_same = webui.post_ok("/sdapi/v1/txt2img", with_checkpoint(BASE, same))
        before = webui.status()
        for _ in range(2):
            for name, eager in ((base, eager_base), (same, eager_same)):
                compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(with_checkpoint(BASE, name)))
                assert_accelerated(compiled)
                assert_same_image(eager, compiled)
                assert_same_image(eager, webui.post_ok("/sdapi/v1/txt2img", with_checkpoint(BASE, name)))
        after = webui.status()
        assert after["compiles"] == before["compiles"]
        assert after["dynamo_graphs_total"] == before["dynamo_graphs_total"], "switching models recompiled"
    finally:
        webui.request("/sdapi/v1/options", {"sd_checkpoints_limit": 1})


def test_status_route_reports_graphs_counters_and_lora(webui):
    status = webui.status()
    assert status["backend"] == "auto" and status["backends_available"]["inductor"] is True
    for graph in status["graphs"]:
        assert graph["backend"] == "inductor" and graph["compile_s"] > 0 and graph["signature"].startswith("UNetModel:")
    # tiny_base's and tiny_heads' structures, and tiny_base's int8 graph (script_args [true])
    assert status["compiles"] == len(status["graphs"]) == 3 and status["reuses"] > 0
    assert sorted(graph["options"]["quantization"] for graph in status["graphs"]) == ["", "", "int8"]
    assert status["recompiles"] >= 2 and status["recompile_limit_hits"] == []
    assert status["dynamo_recompile_limit"] >= 8 * 4  # raised for the 4 structures the fixture lets it keep
    assert status["compiled_call_failures"] == 0 and status["failed_graphs"] == []
    assert status["last_lora_fuse_ms"] is not None
    print("\nstatus:", json.dumps({key: status[key] for key in ("compiles", "reuses", "recompiles",
          "dynamo_graphs_total", "jobs", "accelerated_jobs", "eager_jobs", "last_lora_fuse_ms")}))
    print("graphs:", json.dumps([{key: graph[key] for key in ("signature", "compile_s", "graphs", "recompiles",
          "calls", "reuses")} for graph in status["graphs"]]))


def test_lora_switch_reweight_and_text_encoder_lora_match_eager(webui):
    """Switching LoRAs, changing the weight, a text-encoder-only LoRA and removing them: every accelerated image
    equals the webui's own eager image for the same request, and nothing compiles."""
    plain = with_checkpoint(BASE, webui.checkpoints[0])
    eager_plain = webui.post_ok("/sdapi/v1/txt2img", plain)
    before = webui.status()["dynamo_graphs_total"]
    for name, weight in (("tiny_lora_b", 0.5), ("tiny_lora", 1), ("tiny_lora", 0.3), ("tiny_te_lora", 1), (None, 0)):
        request = dict(plain, prompt=f"{BASE['prompt']} <lora:{name}:{weight}>" if name else BASE["prompt"])
        eager = webui.post_ok("/sdapi/v1/txt2img", request)  # first: the eager job applies the LoRA itself
        compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
        assert_accelerated(compiled)
        if name is None:
            assert_same_image(eager, compiled)
            continue
        assert_same_lora_image(eager, compiled, eager_plain)  # the text encoder's LoRA too, as without the script
        # the LoRA timing is the job's, also when the eager job before it had already applied the same LoRA
        last = webui.status()["last_lora"]
        assert last is not None and [network[0] for network in last["networks"]] == [name], last
    assert webui.status()["dynamo_graphs_total"] == before, "a LoRA change compiled a graph"


def test_int8_image_close_to_float_and_lora_changes_it_alike(webui):
    plain = with_checkpoint(BASE, webui.checkpoints[0])
    with_lora = dict(plain, prompt=BASE["prompt"] + " <lora:tiny_lora:0.3>")
    float_plain = WebUI.image(webui.post_ok("/sdapi/v1/txt2img", plain))
    float_lora = WebUI.image(webui.post_ok("/sdapi/v1/txt2img", with_lora))
    webui.post_ok("/sdapi/v1/txt2img", accelerated(plain, [True]))  # the int8 graph exists or is built here
    before = webui.status()["dynamo_graphs_total"]
    int8_answer = webui.post_ok("/sdapi/v1/txt2img", accelerated(plain, [True]))
    int8_lora = WebUI.image(webui.post_ok("/sdapi/v1/txt2img", accelerated(with_lora, [True])))
    int8_again = WebUI.image(webui.post_ok("/sdapi/v1/txt2img", accelerated(plain, [True])))
    assert INT8_INFO.search(onediff_info(int8_answer)) and "reused" in onediff_info(int8_answer)
    assert webui.status()["dynamo_graphs_total"] == before, "int8 reuse or its LoRA compiled a graph"
    int8_plain = WebUI.image(int8_answer)
    measured = {"int8 vs float": psnr(int8_plain, float_plain), "int8+LoRA vs float+LoRA": psnr(int8_lora, float_lora),
                "int8+LoRA vs float without LoRA": psnr(int8_lora, float_plain),
                "float+LoRA vs float": psnr(float_lora, float_plain)}
    print(f"PSNR (dB): {measured}")
    assert measured["int8 vs float"] >= INT8_MIN_PSNR_DB, measured
    # both graphs served this size: the step times measured in these jobs compare them, in the status route
    # and in the cache folder's record that the checkbox's label reads at the next start
    comparisons = webui.status()["quantization_speed"]
    speed = [each for each in comparisons if each["shape"] == "2x4x8x8"]
    assert speed and speed[0]["scheme"].startswith("int8-") and speed[0]["float_ms"] > 0, comparisons
    saved = json.loads((webui.log_path.parent / "compile-cache" / "quantization-speed.json").read_text())["CPU"]
    assert {key: value for key, value in saved.items() if key != "measured"} in comparisons, (saved, comparisons)
    assert measured["int8+LoRA vs float+LoRA"] >= measured["int8+LoRA vs float without LoRA"] + LORA_MARGIN_DB, measured
    assert psnr(int8_again, int8_plain) >= 40, "removing the LoRA did not restore the int8 image"


def test_attention_the_webui_cannot_compile_is_traced_as_sdp(webui):
    """Doggettx, A1111's default on an NVIDIA GPU, reads the free memory on every call (a graph break per
    attention layer); the compiled graph uses the webui's SDP forward instead and has no graph break. A new
    size (96x64) so that the graph is traced with this setting."""
    assert webui.request("/sdapi/v1/options", {"cross_attention_optimization": "Doggettx"})[0] == 200
    try:
        request = dict(with_checkpoint(BASE, webui.checkpoints[0]), width=96)
        eager = webui.post_ok("/sdapi/v1/txt2img", request)
        compiled = webui.post_ok("/sdapi/v1/txt2img", accelerated(request))
        info = onediff_info(compiled)
        assert_accelerated(compiled)
        assert "sdp attention (for split_cross_attention_forward)" in info, info
        assert webui.status()["last_job"]["graph_breaks"] == 0, info
        assert_same_image(eager, compiled)
    finally:
        webui.request("/sdapi/v1/options", {"cross_attention_optimization": "Automatic"})
