"""Run img2img through a running webui, accelerated by the onediff_diffusion_model script.

    python api_examples/img2img.py --url http://127.0.0.1:7860 --image input.png --out outputs/onediff
"""

import argparse
import base64

from webui_api import SCRIPT, ExampleError, call, report, require_script, save_images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="the webui (started with --api)")
    parser.add_argument("--out", default="outputs/onediff", help="folder for the PNG files")
    parser.add_argument("--image", required=True, help="the input image (PNG or JPEG)")
    parser.add_argument("--prompt", default="a watercolor painting")
    parser.add_argument("--denoising-strength", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--int8", action="store_true", help="ask for int8 quantization (script_args[0])")
    args = parser.parse_args()

    try:
        with open(args.image, "rb") as handle:
            image = base64.b64encode(handle.read()).decode()
    except OSError as error:
        raise ExampleError(f"cannot read --image {args.image}: {error.strerror}") from None
    require_script(args.url, "img2img")
    body = {
        "init_images": [image], "prompt": args.prompt, "denoising_strength": args.denoising_strength,
        "steps": args.steps, "width": args.width, "height": args.height, "seed": args.seed,
        "script_name": SCRIPT, "script_args": [args.int8],
    }
    answer = call(args.url, "/sdapi/v1/img2img", body)
    report(args.url, answer, save_images(answer, args.out, f"img2img-{args.seed}"))


if __name__ == "__main__":
    main()
