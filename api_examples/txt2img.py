"""Generate with txt2img through a running webui, accelerated by the onediff_diffusion_model script.

    python api_examples/txt2img.py --url http://127.0.0.1:7860 --out outputs/onediff
"""

import argparse

from webui_api import SCRIPT, call, report, require_script, save_images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="the webui (started with --api)")
    parser.add_argument("--out", default="outputs/onediff", help="folder for the PNG files")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--checkpoint", help="checkpoint title to use for this request (override_settings)")
    parser.add_argument("--int8", action="store_true", help="ask for int8 quantization (script_args[0])")
    args = parser.parse_args()

    require_script(args.url, "txt2img")
    body = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "width": args.width, "height": args.height, "seed": args.seed, "batch_size": args.batch_size,
        "script_name": SCRIPT,  # the webui's field; the extension also maps OneDiff's "script" to it
        "script_args": [args.int8],
    }
    if args.checkpoint:
        body["override_settings"] = {"sd_model_checkpoint": args.checkpoint}
    answer = call(args.url, "/sdapi/v1/txt2img", body)
    report(args.url, answer, save_images(answer, args.out, f"txt2img-{args.seed}"))


if __name__ == "__main__":
    main()
