"""DepthwiseConv1D/DepthwiseConv2D: one small Kronecker pair per input channel.

Channel c's M = depth_multiplier outputs (channels c·M … c·M + M-1) see only
channel c's patch, so the block is ⊕_c A_c ⊗ G_c: A_c (k×k, k the kernel
positions, +1 for the bias of channel c's outputs) the moments of channel
c's patches and G_c (M×M) those of the gradients at its outputs. It is the
grouped convolution with one group per channel (`grouped_conv.py`): a
(k, C, M) depthwise kernel is the (k, 1, C·M) kernel of groups=C, so A and G
are two grouped factors, (C, k, k) and (C, M, M), not 2·C factors.
"""

from __future__ import annotations

from typing import Any

from kfac_dist.blocks.grouped_conv import GroupedPatchBlock


class DepthwiseConvBlock(GroupedPatchBlock):
    """K-FAC for `keras.layers.DepthwiseConv1D` and `DepthwiseConv2D`: ⊕_c A_c ⊗ G_c."""

    def __init__(self, layer: Any, approx: str | None = None):
        channels, multiplier = (int(d) for d in layer.kernel.shape[-2:])
        self._groups = channels
        self._group_inputs = 1
        self._group_outputs = multiplier
        super().__init__(layer, layer.kernel, layer.bias, approx)
