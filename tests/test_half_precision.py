"""Half-precision generation: bf16 on CPU (fp16 where the CPU has the kernels), logits kept in float32."""

import pytest
import torch
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.models.var import VAR
from vgen.pipelines.var import VARPipeline


def tiny_pipeline() -> VARPipeline:
    torch.manual_seed(0)
    vq = MultiScaleVQModel(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), norm_num_groups=8,
                           patch_nums=(1, 2, 4)).eval()
    var = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 4), depth=2, embed_dim=32, num_heads=2, num_classes=3).eval()
    pipe = VARPipeline(vq, var, default_top_k=0, default_top_p=0.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation_on_cpu(dtype):
    pipe = tiny_pipeline()
    ref = pipe(class_labels=[0, 2], generator=[torch.Generator().manual_seed(s) for s in (0, 1)], top_k=1,
               output_type="pt").images
    pipe.to(dtype)
    assert pipe.transformer.head.weight.dtype == dtype
    cond = pipe.transformer.class_condition(torch.tensor([0, 2]))
    state, x = pipe.transformer.prefill(cond)
    logits = pipe.transformer.logits_for_scale(0, x, state)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    images = pipe(class_labels=[0, 2], generator=[torch.Generator().manual_seed(s) for s in (0, 1)], top_k=1,
                  output_type="pt").images
    assert images.shape == ref.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    # greedy sampling of a random model: half precision changes rounding, not the picture as a whole
    assert (images - ref).abs().mean() < 0.1
