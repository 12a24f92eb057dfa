"""SD.Next (diffusers backend): the job routes the pipeline's ``UNet2DConditionModel.forward`` to the compiled
graph, leaving the object itself in place (``hooks``, ``unet_router``).

Seams on SD.Next: ``processing_diffusers.process_diffusers`` (replaced per job) and the UNet's parameters, which
SD.Next's LoRA replaces with new tensors; ``compile.weight_watch`` notices and copies them into the graph.
"""
