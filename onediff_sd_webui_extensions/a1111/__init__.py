"""AUTOMATIC1111's webui (v1.10.1): the job swaps ldm's / sgm's ``UNetModel`` on ``sd_model.model`` for a stand-in
that calls the compiled graph (``hooks``, ``unet_swap``).

Seams on the webui: ``p.sample`` (wrapped per job), the built-in Lora extension's ``networks`` module
(``lora_bridge``: LoRA applied eagerly into the graph's weights) and the attention forwards of
``sd_hijack_optimizations`` (``attention``: swapped for its traceable SDP forward while tracing).
"""
