"""A toy UNet of ldm's layout (time_embed, input_blocks, middle_block, output_blocks, out; blocks called as
``block(h, emb, context)``) for tests that need ldm's structure without the webui's ldm package."""

import math

import torch


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Looked up by ResidualUNet in the UNet's module, as ldm's forward does (this test module here)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(torch.nn.Module):
    """A block with ldm's call signature ``(h, emb, context)``; ``resample`` -1 halves the size, +1 doubles it."""

    def __init__(self, channels_in, channels_out, resample=0, emb_dim=32, context_dim=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels_in, channels_out, 3, padding=1, stride=2 if resample < 0 else 1)
        self.emb = torch.nn.Linear(emb_dim, channels_out)
        self.context = torch.nn.Linear(context_dim, channels_out)
        self.resample = resample

    def forward(self, h, emb, context):
        h = self.conv(h) + self.emb(emb)[:, :, None, None] + self.context(context.mean(1))[:, :, None, None]
        h = torch.nn.functional.silu(h)
        return torch.nn.functional.interpolate(h, scale_factor=2.0) if self.resample > 0 else h


class ToyUNet(torch.nn.Module):
    """ldm's layout at toy size: 6 input blocks (a downsample at 3), a middle block, 6 output blocks."""

    def __init__(self, c=8):
        super().__init__()
        self.model_channels = c
        self.num_classes = None
        self.dtype = torch.float32
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(c, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32))
        self.input_blocks = torch.nn.ModuleList([
            Block(4, c), Block(c, c), Block(c, c), Block(c, c, resample=-1), Block(c, 2 * c), Block(2 * c, 2 * c)])
        self.middle_block = Block(2 * c, 2 * c)
        self.output_blocks = torch.nn.ModuleList([
            Block(4 * c, 2 * c), Block(4 * c, 2 * c), Block(3 * c, c, resample=1), Block(2 * c, c), Block(2 * c, c),
            Block(2 * c, c)])
        self.out = torch.nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x, timesteps=None, context=None, y=None):  # ldm's forward, without residuals
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
