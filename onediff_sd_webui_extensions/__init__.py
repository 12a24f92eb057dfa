"""onediff_sd_webui_extensions: the webui-facing side of the extension (Script support, status, the bench CLI).

The torch-level work (backends, graph cache, weight binding) lives in the top-level ``compile`` package, which
imports nothing from the webui."""
