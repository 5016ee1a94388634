"""The model layer: tiny SD, loading from folders, the DDIM schedule, mutual self-attention, LoRA plumbing."""

import json
import os

import pytest
import torch

import fastdrag
from fastdrag.attention import MutualAttentionControl, MutualSelfAttnProcessor, mutual_attention, transformer_blocks
from fastdrag.ddim import Schedule
from fastdrag.errors import ModelLoadError
from fastdrag.lora import ensure_adapter, get_lora, set_lora
from fastdrag.model import make_scheduler


def test_tiny_model_has_sd15_structure(tiny_model):
    unet = tiny_model.unet
    assert len(unet.down_blocks) == 4 and len(unet.up_blocks) == 4
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                           "CrossAttnUpBlock2D"]
    assert len(transformer_blocks(unet)) == 16  # the MasaCtrl layer indices mean what they mean in SD-1.5
    assert tiny_model.resolution == 128 and tiny_model.vae_scale == 8


def test_tiny_model_is_deterministic():
    a = fastdrag.load_model("tiny", device="cpu")
    b = fastdrag.load_model("tiny", device="cpu")
    for (n, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), n


def test_save_and_load_by_path_round_trip(tiny_model, tmp_path):
    from fastdrag.lora import ensure_adapter
    from fastdrag.model import ALIGN

    ensure_adapter(tiny_model.unet, rank=4)  # an Editor leaves a per-image LoRA behind: it is not saved
    tiny_model.unet.disable_adapters()
    tiny_model.save_pretrained(str(tmp_path))
    m = fastdrag.load_model(str(tmp_path), device="cpu")
    base = {n: p for n, p in tiny_model.unet.named_parameters() if "lora_" not in n}
    names = {n.replace(".base_layer", ""): p for n, p in base.items()}
    loaded = dict(m.unet.named_parameters())
    assert names.keys() == loaded.keys()
    assert all(torch.equal(names[n], p) for n, p in loaded.items())  # the same weights, bit for bit (no arithmetic)
    # ... in storage of their own, aligned like any fresh tensor: from_pretrained's 8-byte offsets made the CPU math
    # libraries sum in another order than for the same weights built in memory (1e-6 per UNet pass on an AMD EPYC)
    for net in (m.unet, m.vae, m.text_encoder):
        assert all(t.data_ptr() % ALIGN == 0 for t in (*net.parameters(), *net.buffers()))
    z = torch.randn(1, 4, 16, 16)
    c = tiny_model.encode_prompt("a cat")
    # Two separately allocated models: equal weights, but a CPU may still order sums by address, so compare with a
    # tolerance. Float noise is ~1e-6 here; a weight lost or mis-mapped in the round trip moves the output by > 1e-2.
    torch.testing.assert_close(c, m.encode_prompt("a cat"), rtol=0, atol=1e-5)
    with torch.no_grad():
        e1 = tiny_model.unet(z, 681, encoder_hidden_states=c).sample
        e2 = m.unet(z, 681, encoder_hidden_states=c).sample
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-5)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.vae.encode(x).latent_dist.mean, m.vae.encode(x).latent_dist.mean,
                                   rtol=0, atol=1e-5)


def test_load_rejects_non_sd_folders(tmp_path, tiny_model):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        fastdrag.load_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Foo", "unet": ["diffusers", "X"]}))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion"):
        fastdrag.load_model(str(tmp_path))
    # an SD folder whose UNet is not SD-1.x shaped
    sd = tmp_path / "sd"
    tiny_model.save_pretrained(str(sd))
    cfg = json.loads((sd / "unet" / "config.json").read_text())
    cfg["up_block_types"] = ["UpBlock2D"] * 4
    (sd / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not an SD-1.x UNet"):
        fastdrag.load_model(str(sd))
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        fastdrag.load_model(str(f))


def test_hub_id_without_network_is_a_clear_error():
    # HF_HUB_OFFLINE=1 in tests: the real from_pretrained path runs and its failure is reported by name.
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        fastdrag.load_model("no-such-org/no-such-model")


def test_scheduler_matches_the_official_configuration():
    s = make_scheduler()
    assert s.config.beta_schedule == "scaled_linear" and s.config.steps_offset == 1
    assert s.config.set_alpha_to_one is False and s.config.clip_sample is False
    sched = Schedule.make(s, 50, 0.7)
    assert sched.timesteps[:3] == (981, 961, 941) and sched.timesteps[-1] == 1
    assert sched.n_actual == 35 and sched.t_edit == 681
    assert sched.inversion_timesteps[0] == 1 and sched.inversion_timesteps[-1] == 681
    assert sched.denoise_timesteps == tuple(range(681, 0, -20))
    assert Schedule.make(s, 50, 0.75).t_edit == 741 and Schedule.make(s, 50, 0.75).n_actual == 38  # banker's
    assert sched.final_alpha == pytest.approx(0.99915, abs=1e-5)


def test_ddim_inversion_and_step_are_inverse_for_constant_eps():
    sched = Schedule.make(make_scheduler(), 50, 0.7)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x)
    y = sched.inv_step(eps, 681, x)  # 661 -> 681
    torch.testing.assert_close(sched.step(eps, 681, y), x)


def test_mutual_attention_is_installed_on_exactly_the_official_layers(tiny_model):
    blocks = transformer_blocks(tiny_model.unet)
    # start_layer 10 = the self-attention of every transformer block in up_blocks[2] and up_blocks[3]
    expect = [b.attn1 for ub in tiny_model.unet.up_blocks[2:] for a in ub.attentions for b in a.transformer_blocks]
    with mutual_attention(tiny_model.unet, 0, 10):
        controlled = [b.attn1 for b in blocks if isinstance(b.attn1.processor, MutualSelfAttnProcessor)]
        assert not any(isinstance(b.attn2.processor, MutualSelfAttnProcessor) for b in blocks)
    assert controlled == expect and len(controlled) == 6
    assert not any(isinstance(b.attn1.processor, MutualSelfAttnProcessor) for b in blocks)  # restored


def test_mutual_attention_edited_branch_reads_reference_kv(tiny_model):
    attn = transformer_blocks(tiny_model.unet)[12].attn1
    x = torch.randn(2, 20, attn.to_q.in_features)
    proc = MutualSelfAttnProcessor(MutualAttentionControl(start_step=0))
    with torch.no_grad():
        out = proc(attn, x)
        h = attn.heads
        q, k, v = attn.to_q(x), attn.to_k(x[:1]), attn.to_v(x[:1])
        d = q.shape[-1] // h
        sp = lambda t: t.view(t.shape[0], -1, h, d).transpose(1, 2)  # noqa: E731
        w = torch.softmax(sp(q) @ sp(k).transpose(-1, -2) / d ** 0.5, -1)
        ref = attn.to_out[0]((w @ sp(v)).transpose(1, 2).reshape(2, 20, h * d))
        plain = attn.processor(attn, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=1e-5)  # reference branch = plain self-attention
    assert not torch.allclose(out[1], plain[1], atol=1e-4)
    late = MutualSelfAttnProcessor(MutualAttentionControl(start_step=3))
    with torch.no_grad():
        torch.testing.assert_close(late(attn, x), plain)  # before start_step: plain attention


def test_lora_adapter_init_and_set():
    unet = fastdrag.load_model("tiny", device="cpu").unet  # a fresh model: this test adds and removes adapters
    z, c = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = unet(z, 501, encoder_hidden_states=c).sample
    ensure_adapter(unet, rank=4, seed=0)
    w = get_lora(unet)
    assert len([n for n in w if "lora_A" in n]) == 4 * 32  # q, k, v, out of all 32 attention modules
    downs = [t for n, t in w.items() if "lora_A" in n]
    assert all(torch.count_nonzero(t) == t.numel() for t in downs)
    assert all(torch.count_nonzero(t) == 0 for n, t in w.items() if "lora_B" in n)  # up = 0: identity at init
    with torch.no_grad():
        torch.testing.assert_close(unet(z, 501, encoder_hidden_states=c).sample, base)
    w = {n: (t + 0.05 if "lora_B" in n else t) for n, t in w.items()}
    set_lora(unet, w)
    with torch.no_grad():
        assert not torch.allclose(unet(z, 501, encoder_hidden_states=c).sample, base, atol=1e-4)
    set_lora(unet, None)
    with torch.no_grad():
        torch.testing.assert_close(unet(z, 501, encoder_hidden_states=c).sample, base)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Model folders that cannot serve an edit: each is a ModelLoadError at load that says which (issue 18, item 5)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "tiny-sd"
    fastdrag.load_model("tiny", device="cpu").save_pretrained(str(path))
    return path


@pytest.fixture
def damaged(saved_tiny, tmp_path):
    """A fresh copy of the saved tiny model, to damage."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(saved_tiny, dst)
    return dst


@pytest.mark.parametrize("arg", [None, 3, b"tiny", ["tiny"]])
def test_load_model_refuses_a_non_string_argument(arg):
    with pytest.raises(ModelLoadError) as e:
        fastdrag.load_model(arg, device="cpu")
    assert "must be a string or a path" in str(e.value) and f"got {arg!r} ({type(arg).__name__})" in str(e.value)


def test_load_model_takes_a_pathlib_path(damaged):
    m = fastdrag.load_model(damaged, device="cpu")  # an undamaged copy, as a pathlib.Path
    assert m.name == str(damaged)


def test_a_missing_folder_is_said_to_be_missing(tmp_path):
    for p in (tmp_path / "runs" / "sd15", "./no-such-dir/sd15", "~/no/such/model"):
        with pytest.raises(ModelLoadError, match="folder .* does not exist"):
            fastdrag.load_model(str(p), device="cpu")


def test_a_folder_without_tokenizer_fails_at_load_not_at_the_first_edit(damaged):
    import shutil

    shutil.rmtree(damaged / "tokenizer")
    with pytest.raises(ModelLoadError, match=r"missing tokenizer/$"):
        fastdrag.load_model(str(damaged), device="cpu")


def test_a_tokenizer_folder_without_vocabulary_fails_at_load(damaged):
    (damaged / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing tokenizer/tokenizer.json \(or tokenizer/vocab.json"):
        fastdrag.load_model(str(damaged), device="cpu")


def test_every_missing_component_is_listed(damaged):
    import shutil

    shutil.rmtree(damaged / "unet")
    (damaged / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (damaged / "text_encoder" / "config.json").unlink()
    with pytest.raises(ModelLoadError) as e:
        fastdrag.load_model(str(damaged), device="cpu")
    assert str(e.value).endswith("missing unet/, vae/ weights (*.safetensors or *.bin), text_encoder/config.json")


@pytest.mark.parametrize("name", ["model_index.json", "unet/config.json", "vae/config.json",
                                  "text_encoder/config.json", "tokenizer/tokenizer_config.json",
                                  "scheduler/scheduler_config.json"])
def test_a_corrupt_json_file_is_named_with_its_parse_error(damaged, name):
    f = damaged / name
    f.write_text(f.read_text()[:-20])  # truncated
    with pytest.raises(ModelLoadError, match=rf"{name} is not valid JSON \(.*line \d+ column \d+"):
        fastdrag.load_model(str(damaged), device="cpu")


def test_a_tokenizer_that_does_not_fit_the_text_encoder_fails_at_load(damaged):
    cfg_path = damaged / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["model_max_length"]  # transformers then pads to ~1e30 tokens: OverflowError at the first edit
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="the tokenizer pads prompts to .* the text encoder reads 77 positions"):
        fastdrag.load_model(str(damaged), device="cpu")


def test_an_uncached_hub_id_offline_says_offline_and_not_in_the_cache(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("no-such-org/no-such-model", "mistyped-model"):  # the second may be a folder name or a hub id
        with pytest.raises(ModelLoadError) as e:
            fastdrag.load_model(name, device="cpu")
        msg = str(e.value)
        assert "not a local folder" in msg and "offline" in msg
        assert f"not in the cache ({constants.HF_HUB_CACHE})" in msg


def test_an_uncached_hub_id_without_network_says_unreachable(monkeypatch):
    """What huggingface_hub raises with no network (seen with a refused connection: LocalEntryNotFoundError under an
    OSError from diffusers, after ~25 s of retries) is reported as that, not as a missing config.json."""
    import diffusers
    from huggingface_hub.errors import LocalEntryNotFoundError

    import fastdrag.model as fd_model

    def no_network(*a, **k):
        try:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        except LocalEntryNotFoundError:
            raise OSError("no-such-org/no-such-model does not appear to have a file named config.json.")

    monkeypatch.setattr(fd_model, "_hub_offline", lambda: False)
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", no_network)
    with pytest.raises(ModelLoadError, match=r"not a local folder, the hub is unreachable \(no network\?\) and it is "
                                             r"not in the cache"):
        fastdrag.load_model("no-such-org/no-such-model", device="cpu")


def test_a_replacement_vae_that_cannot_load_says_why(damaged, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"VAE 'no-such-org/no-vae' is not a local folder .* offline .* not in "
                                             r"the cache"):
        fastdrag.load_model(str(damaged), device="cpu", vae="no-such-org/no-vae")
    (tmp_path / "vae").mkdir()
    with pytest.raises(ModelLoadError, match=r"VAE folder .* missing vae/config.json, vae/ weights"):
        fastdrag.load_model(str(damaged), device="cpu", vae=str(tmp_path / "vae"))
    m = fastdrag.load_model(str(damaged), device="cpu", vae=str(damaged / "vae"))  # a good folder loads
    assert m.vae.config.latent_channels == 4
