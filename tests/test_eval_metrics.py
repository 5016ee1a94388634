"""Metrics against their definitions: DAI by hand, LPIPS / CLIP / DIFT on random stand-in networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdrag.errors import InvalidInputError, ModelLoadError
from fastdrag.eval.metrics import dai as dai_mod
from fastdrag.eval.metrics import lpips as lp

from .conftest import smooth_image


def test_dai_hand_computed():
    a = np.zeros((10, 10, 3), np.uint8)
    b = np.zeros((10, 10, 3), np.uint8)
    b[5, 5] = 255  # one pixel, all three channels, at the first pair's target
    b[2, 7, 0] = 51  # 0.2 in one channel at the second pair's target
    pts = [((1, 1), (5, 5)), ((8, 8), (7, 2))]
    out = dai_mod.dai(a, b, pts, 1)
    total = 3 * 1.0 + 0.2 ** 2
    assert out["dai_per_pair_r1"] == pytest.approx(total / 2 / 9)
    assert out["dai_official_r1"] == pytest.approx(total / 2 / 9 / 2)
    # r = 0 keeps only the centre pixels
    assert dai_mod.dai(a, b, pts, 0)["dai_per_pair_r0"] == pytest.approx(total / 2)


def test_dai_patch_leaving_the_image_is_an_error():
    a = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(InvalidInputError, match="radius-5 patch around the handle point \\(1, 1\\) leaves"):
        dai_mod.dai(a, a, [((1, 1), (5, 5))], 5)
    with pytest.raises(InvalidInputError, match="target point \\(9, 5\\)"):
        dai_mod.dai(a, a, [((5, 5), (9, 5))], 1)
    with pytest.raises(InvalidInputError, match="not on a pixel"):
        dai_mod.dai(a, a, [((5.5, 5), (5, 5))], 1)


def _random_lpips_files(tmp_path):
    g = torch.Generator().manual_seed(1)
    alex = {}
    for idx, i, o, k, _, _ in lp.ALEX_CONVS:
        alex[f"features.{idx}.weight"] = torch.randn(o, i, k, k, generator=g) * (2.0 / (i * k * k)) ** 0.5
        alex[f"features.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    alex["classifier.1.weight"] = torch.zeros(2, 2)  # the rest of torchvision's file is ignored
    lin = {f"lin{j}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for j, c in enumerate(lp.CHANNELS)}
    torch.save(alex, tmp_path / "alexnet.pth")
    torch.save(lin, tmp_path / "alex.pth")
    return alex, lin


def _lpips_reference(alex, lin, x0, x1):
    """LPIPS v0.1 written out plainly from the paper / lpips package's definition."""
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def feats(x):
        x = (x - shift) / scale
        x = F.relu(F.conv2d(x, alex["features.0.weight"], alex["features.0.bias"], stride=4, padding=2))
        r1 = x
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), alex["features.3.weight"], alex["features.3.bias"], padding=2))
        r2 = x
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), alex["features.6.weight"], alex["features.6.bias"], padding=1))
        r3 = x
        x = F.relu(F.conv2d(x, alex["features.8.weight"], alex["features.8.bias"], padding=1))
        r4 = x
        x = F.relu(F.conv2d(x, alex["features.10.weight"], alex["features.10.bias"], padding=1))
        return [r1, r2, r3, r4, x]

    total = 0.0
    for j, (a, b) in enumerate(zip(feats(x0), feats(x1))):
        a = a / (torch.sqrt(torch.sum(a ** 2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b ** 2, dim=1, keepdim=True)) + 1e-10)
        total = total + (F.conv2d((a - b) ** 2, lin[f"lin{j}.model.1.weight"])).mean(dim=[2, 3], keepdim=True)
    return total.view(-1)


def test_lpips_matches_its_definition_on_random_weights(tmp_path):
    alex, lin = _random_lpips_files(tmp_path)
    m = lp.LPIPSMetric(lpips_weights=str(tmp_path / "alex.pth"), alexnet_weights=str(tmp_path / "alexnet.pth"))
    m.setup("cpu")
    src, other = smooth_image(96, 80, seed=3), smooth_image(96, 80, seed=4)
    got = m.score(type("S", (), {"image": src})(), Image.fromarray(other), {})
    x0 = F.interpolate(torch.from_numpy(src).float().permute(2, 0, 1)[None] / 127.5 - 1, (224, 224),
                       mode="bilinear")
    x1 = F.interpolate(torch.from_numpy(other).float().permute(2, 0, 1)[None] / 127.5 - 1, (224, 224),
                       mode="bilinear")
    want = _lpips_reference(alex, lin, x0, x1).item()
    assert want > 1e-3
    assert got["lpips"] == pytest.approx(want, rel=1e-5)
    assert got["if"] == pytest.approx(1 - want, rel=1e-5)
    assert m.distance(src, Image.fromarray(src)) == 0.0
    # an edit of another size is resized to the source first (PIL bilinear), as the official script
    big = Image.fromarray(other).resize((160, 192), Image.BILINEAR)
    back = np.array(big.resize((80, 96), Image.BILINEAR))
    assert m.distance(src, big) == pytest.approx(m.distance(src, Image.fromarray(back)), rel=1e-6)


def test_lpips_weight_files_checked(tmp_path):
    _random_lpips_files(tmp_path)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "short.pth")
    with pytest.raises(ModelLoadError, match="no 'lin1.model.1.weight'"):
        lp.LPIPSAlex().load_published(str(tmp_path / "alexnet.pth"), str(tmp_path / "short.pth"))
    with pytest.raises(ModelLoadError, match="no file"):
        lp.LPIPSAlex().load_published(str(tmp_path / "missing.pth"), str(tmp_path / "alex.pth"))
    torch.save({"lin0.model.1.weight": torch.zeros(1, 32, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError, match="shape"):
        lp.LPIPSAlex().load_published(str(tmp_path / "alexnet.pth"), str(tmp_path / "bad.pth"))


def test_clip_preprocess_is_clips_transform():
    from fastdrag.eval.metrics.clip_sim import MEAN, STD, clip_preprocess

    img = Image.fromarray(smooth_image(60, 100, seed=5))  # 100 wide, 60 high
    x = clip_preprocess(img)
    assert x.shape == (1, 3, 224, 224)
    # by hand: shorter side 60 -> 224, longer int(224 * 100 / 60) = 373, crop left round(74.5) = 74, top 0
    r = np.array(img.resize((373, 224), Image.BICUBIC))[0:224, 74:298].astype(np.float32) / 255
    want = (r - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_clip_similarity_on_a_tiny_random_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from fastdrag.eval.metrics.clip_sim import CLIPSimilarityMetric, clip_preprocess

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=4, vocab_size=99),
                                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=224, patch_size=32),
                                 projection_dim=16))
    model.save_pretrained(tmp_path / "clip")
    m = CLIPSimilarityMetric(str(tmp_path / "clip"))
    m.setup("cpu")
    a, b = Image.fromarray(smooth_image(96, 80, seed=1)), Image.fromarray(smooth_image(96, 80, seed=2))
    got = m.score(type("S", (), {"image": np.array(a)})(), b, {})["clip_sim"]
    with torch.no_grad():
        ea = model.visual_projection(model.vision_model(pixel_values=clip_preprocess(a)).pooler_output)
        eb = model.visual_projection(model.vision_model(pixel_values=clip_preprocess(b)).pooler_output)
    want = F.cosine_similarity(ea, eb).item()
    assert got == pytest.approx(want, abs=1e-5) and abs(want) < 0.9999
    assert m.similarity(a, a) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    """A tiny random SD-2-like model folder (linear-projection attention, v-prediction scheduler config)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastdrag.model import _tiny_tokenizer

    root = tmp_path_factory.mktemp("sd2") / "tiny-sd2"
    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                         use_linear_projection=True, norm_num_groups=16).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                  ).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(root / "scheduler")
    return str(root)


def test_dift_features_match_the_definition(tiny_sd2):
    from fastdrag.eval.metrics.md import DiftFeaturizer

    dift = DiftFeaturizer(tiny_sd2, "cpu")
    img = torch.from_numpy(smooth_image(32, 40, seed=2)).float().div(255).sub(0.5).mul(2).permute(2, 0, 1)[None]
    torch.manual_seed(7)
    got = dift.features(img, "a cat", t=261, up_ft_index=1, ensemble=3)
    # by hand: posterior sample, then randn_like, q(x_t | x_0) from alphas_cumprod, the full UNet pass, the block
    torch.manual_seed(7)
    x = img.repeat(3, 1, 1, 1)
    lat = dift.vae.encode(x).latent_dist.sample() * dift.vae.config.scaling_factor
    noise = torch.randn_like(lat)
    a = dift.scheduler.alphas_cumprod[261]
    noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
    ids = dift.tokenizer("a cat", padding="max_length", max_length=dift.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    emb = dift.text_encoder(ids).last_hidden_state.repeat(3, 1, 1)
    seen = []
    h = dift.unet.up_blocks[1].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        dift.unet(noisy, 261, encoder_hidden_states=emb)
    h.remove()
    want = seen[0].mean(0, keepdim=True)
    assert got.shape == want.shape == (1, 32, 16, 20)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_match_distances_by_hand():
    from fastdrag.eval.metrics.md import match_distances

    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 8, 12, 16, generator=g)
    edit = torch.roll(src, shifts=(2, 3), dims=(2, 3))  # content moved 3 px right, 2 px down
    pts = [((5, 4), (8, 6)), ((5, 4), (5, 4)), ((10, 7), (12, 7))]
    d = match_distances(src, edit, pts)
    assert d == pytest.approx([0.0, np.hypot(3, 2), np.hypot(1, 2)])


def test_md_is_zero_for_an_unedited_image(tiny_sd2):
    from fastdrag.eval.metrics.md import MeanDistanceMetric

    m = MeanDistanceMetric(tiny_sd2, ensemble=2)
    m.setup("cpu")
    img = smooth_image(32, 40, seed=3)
    pts = [((10, 12), (10, 12)), ((30, 20), (30, 20))]
    sample = type("S", (), {"id": "x/y", "image": img, "prompt": "p", "points": pts})()
    out = m.score(sample, Image.fromarray(img), {})
    assert out == {"md": 0.0, "md_pairs_sum": 0.0, "md_pairs_n": 2}
    moved = [((10, 12), (14, 12)), ((30, 20), (30, 23))]
    sample.points = moved
    assert m.score(sample, Image.fromarray(img), {})["md"] == pytest.approx((4 + 3) / 2)
