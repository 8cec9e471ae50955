import pytest
import torch
import torch.nn.functional as F

from hipt_ray.models import create_model, normalize_uint8
from hipt_ray.models.inference import fast_dtype, prepare_for_inference


def _model():
    torch.manual_seed(0)
    return create_model("hipt4k_tiny", micro_batch=8).eval()


def test_bf16_eager_path_agrees_with_fp32():
    m = _model()
    x = torch.randn(1, 3, 512, 768)
    with torch.no_grad():
        ref = m(x)
        fast = prepare_for_inference(m, dtype=torch.bfloat16, compile=False)
        out = fast(x)
    assert out.dtype == torch.float32 and F.cosine_similarity(out, ref).min() > 0.99
    assert next(m.parameters()).dtype == torch.float32  # the original is untouched


def test_compiled_default_path_agrees_with_fp32():
    m = _model()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        ref = m(x)
        fast = prepare_for_inference(m)  # compiled, fast_dtype(cpu)
        out = fast.forward_features(x)
    assert F.cosine_similarity(out["emb4k"], ref).min() > 0.99
    assert out["tokens256"].dtype == torch.float32 and out["tokens256"].shape == (1, 4, 48)
    assert fast_dtype("cpu") in (torch.bfloat16, torch.float32)


def test_compiled_path_compiles_once_whatever_the_region_size():
    # Edge regions come in many sizes; each used to recompile both models (minutes on a CPU).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = _model()
    fast = prepare_for_inference(m, dtype=torch.float32)
    assert fast.pad_patches == 8  # the micro-batch (8) is below 32
    with torch.no_grad():  # the route the model actors take: uint8 pixels
        for h, w in ((512, 768), (256, 1280), (768, 768), (256, 256)):
            img = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
            out, ref = fast.forward_uint8(img), m.forward_features(normalize_uint8(img))
            assert torch.allclose(out["tokens256"], ref["tokens256"], atol=1e-4)  # padding changes nothing
            assert torch.allclose(out["emb4k"], ref["emb4k"], atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_failure_falls_back_to_eager():
    from hipt_ray.models.inference import CastInputs

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no compiler here")

    eager = torch.nn.Linear(4, 2)
    wrapped = CastInputs(Broken(), torch.float32, eager=eager)
    x = torch.randn(3, 4)
    assert torch.equal(wrapped(x), eager(x)) and wrapped.eager is None


def test_attention_maps_need_the_model_as_built():
    m = _model()
    x = torch.randn(1, 3, 256, 512)
    fast = prepare_for_inference(m, dtype=torch.bfloat16, compile=False)  # ViTs wrapped in CastInputs
    with pytest.raises(TypeError, match=r"not one prepared for inference \(ViT-256 is a CastInputs"):
        fast.get_attention(x)
    attn256, attn4k = m.get_attention(x)  # the original still gives them
    assert attn256.shape[0] == 2 and attn4k.shape[-1] == 3  # 2 patches; CLS + 2 tokens
