"""onediff_sd_webui_extensions: the webui-facing side of the extension.

Shared by every webui, at this level: ``state`` (the one object that remembers), ``webui_common`` (settings,
status route, checkbox), ``api_form``, ``compile_progress``, ``hosts`` (which webui runs us, and the only way
to a host subpackage) and the ``bench`` CLI. One subpackage per webui: ``a1111/`` and ``sdnext/``; neither
imports the other.

The torch-level work (backends, graph cache, weight binding) lives in the top-level ``compile`` package, which
imports nothing from the webui."""
