# Triton kernels run on the CPU interpreter in CI; this must be set before any @triton.jit runs.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    import fastdrag

    return fastdrag.load_model("tiny", device="cpu")


def smooth_image(h=128, w=128, seed=0) -> np.ndarray:
    """A smooth synthetic RGB picture (random low-frequency colours + a disc), HxWx3 uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, (h, w), mode="bicubic", align_corners=False)[0]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = ((yy - h * 0.5) ** 2 + (xx - w * 0.4) ** 2) < (min(h, w) * 0.2) ** 2
    img[0][disc] = 0.9
    img[1][disc] = 0.3
    img[2][disc] = 0.2
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@pytest.fixture
def image():
    return smooth_image()


@pytest.fixture(scope="module")
def editor(tiny_model):
    """One Editor per test module: its preparations (LoRA, inversion, references) are shared by the module's tests."""
    import fastdrag

    return fastdrag.Editor(tiny_model)


@pytest.fixture(scope="module")
def img():
    return smooth_image()


# small settings that keep a full edit around a few seconds on 2 CPU cores
FAST = dict(lora_steps=4, n_pix_step=8)


def spy_text_updates_and_mask_terms(monkeypatch, method_module):
    """Record, in a drag loop of `method_module`, the loss each TextLeaf.update differentiates and the value of each
    mask term. Returns the two lists, filled as the loop runs."""
    from fastdrag.pipeline import TextLeaf

    seen, mask_terms = [], []
    real_update, real_mask_term = TextLeaf.update, method_module.mask_term

    def update(self, loss_ms, done=None):
        seen.append(loss_ms.detach().clone())
        return real_update(self, loss_ms, done)

    def mask_term(*a, **k):
        out = real_mask_term(*a, **k)
        mask_terms.append(float(out.detach()))
        return out

    monkeypatch.setattr(TextLeaf, "update", update)
    monkeypatch.setattr(method_module, "mask_term", mask_term)
    return seen, mask_terms
