"""Audio: log-mel features against a numpy reference, the DTMF tones generator, the audio
stream (wav + flac, corrupt clips skipped and counted), both audio towers, audio-text
(and three-tower) contrastive objectives in the gradient-cached step, config checks, and
one short end-to-end train + zero-shot run on tones."""
import copy
import json
import os
import random
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

from tests.test_eval import assert_within, count_recall, count_zeroshot
from tests.test_gradcache import _assert_close, _full_graph_grads, _grads_after_step
from tests.tiny import child_env, tiny_model_cfg
from vlp.data.audio import AudioConfig, AudioTransform, crop_or_pad, log_mel, resample, spec_augment
from vlp.data.config import DataConfig
from vlp.data.shards import write_shards
from vlp.data.stream import build_eval_loader
from vlp.data.tones import COLUMNS, KEYPAD, ROWS, audio_bytes, dtmf_frequencies, dtmf_tone, write_tones
from vlp.models import create_model
from vlp.objectives import build_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- log-mel features ----------------------------------------------------------------------


def _htk_filters(sr, n_fft, n_mels, f_min, f_max):
    """(F, M) triangular HTK mel filters, height 1, written out from the definition."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))  # (M + 2,) Hz
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)  # (F,) bin centres
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, c, hi = edges[m : m + 3]
        fb[:, m] = np.clip(np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)), 0.0, None)
    return fb


def _numpy_log_mel(wave, cfg: AudioConfig):
    """Centred STFT with reflect padding and a periodic Hann window, power, mel, log, normalise."""
    n, hop = cfg.n_fft, cfg.hop_length
    padded = np.pad(wave, n // 2, mode="reflect")
    frames = np.stack([padded[i * hop : i * hop + n] for i in range(1 + (len(padded) - n) // hop)])  # (T, n)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (T, F)
    fb = _htk_filters(cfg.sample_rate, n, cfg.n_mels, cfg.f_min, cfg.f_max or cfg.sample_rate / 2)
    return ((np.log(power @ fb + cfg.log_offset) - cfg.norm_mean) / cfg.norm_std).T  # (M, T)


@pytest.mark.parametrize("cfg", [AudioConfig(), AudioConfig(sample_rate=8000, n_fft=256, hop_length=100, n_mels=40,
                                                             f_min=50.0, f_max=3800.0, seconds=0.7)])
def test_log_mel_equals_numpy_reference(cfg):
    wave = np.random.default_rng(0).normal(0, 0.1, cfg.num_samples)
    got = log_mel(torch.from_numpy(wave), cfg)  # float64 in, float64 out
    assert got.shape == (cfg.n_mels, cfg.frames)
    ref = _numpy_log_mel(wave, cfg)
    assert np.abs(got.numpy() - ref).max() < 1e-6


def test_log_mel_of_a_sine_peaks_at_its_mel_band():
    cfg = AudioConfig(norm_mean=0.0, norm_std=1.0)
    fb = _htk_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels, 0.0, cfg.sample_rate / 2)
    centres = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)[fb.argmax(axis=0)]  # (M,) Hz
    t = np.arange(cfg.num_samples) / cfg.sample_rate
    for f in (300.0, 1000.0, 3000.0):
        x = log_mel(torch.from_numpy(np.sin(2 * np.pi * f * t)), cfg)  # (M, T)
        band = int(x[:, 5:-5].mean(dim=1).argmax())
        assert abs(centres[band] - f) <= np.diff(centres)[max(band - 1, 0)], (f, centres[band])


def test_resample_keeps_the_frequency_and_crop_or_pad_lengths():
    t = np.arange(8000) / 8000
    up = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 8000, 16000)
    assert len(up) == 16000
    assert np.argmax(np.abs(np.fft.rfft(up))) * 16000 / len(up) == 1000
    wave = np.arange(10, dtype=np.float32) + 1
    assert crop_or_pad(wave, 4).tolist() == [4, 5, 6, 7]  # eval: the centre
    assert crop_or_pad(wave, 12).tolist() == list(range(1, 11)) + [0, 0]  # eval: padded at the end
    rng = random.Random(0)
    for _ in range(20):
        crop = crop_or_pad(wave, 4, rng)
        assert len(crop) == 4 and np.all(np.diff(crop) == 1)  # a contiguous slice
        pad = crop_or_pad(wave, 13, rng)
        assert len(pad) == 13 and pad[pad > 0].tolist() == list(range(1, 11))


def test_spec_augment_masks_bounded_bands():
    cfg = AudioConfig(freq_masks=1, freq_mask_width=5, time_masks=1, time_mask_width=7)
    x = torch.randn(1, cfg.n_mels, cfg.frames)
    rng = random.Random(1)
    for _ in range(20):
        y = spec_augment(x, cfg, rng)
        changed = y != x  # (1, M, T)
        rows = changed.all(dim=2)[0].nonzero().flatten()  # whole mel rows masked
        cols = changed.all(dim=1)[0].nonzero().flatten()  # whole frames masked
        assert len(rows) <= 5 and len(cols) <= 7
        assert (changed[0] == (rows[:, None] == torch.arange(cfg.n_mels)).any(0)[:, None]
                | (cols[:, None] == torch.arange(cfg.frames)).any(0)[None, :]).all()  # nothing else
        if len(rows):
            assert torch.all(torch.diff(rows) == 1) and torch.allclose(y[0, rows], y[0, rows[0], 0])


# ---- DTMF tones ------------------------------------------------------------------------------


def _two_peaks(wave, sr):
    """Strongest frequency below and above 1100 Hz (Hz), from a zero-padded FFT."""
    spec = np.abs(np.fft.rfft(wave, n=8 * len(wave)))
    freqs = np.fft.rfftfreq(8 * len(wave), 1 / sr)
    low, high = freqs < 1100, freqs >= 1100
    return freqs[low][spec[low].argmax()], freqs[high][spec[high].argmax()]


def test_tones_have_their_dtmf_pair():
    rng = np.random.default_rng(0)
    for digit in range(10):
        row, col = dtmf_frequencies(digit)
        for _ in range(5):
            wave, info = dtmf_tone(digit, rng)
            f_low, f_high = _two_peaks(wave, 8000)
            assert abs(f_low - info["row_hz"]) < 3 and abs(f_high - info["col_hz"]) < 3  # the drawn tones
            assert abs(f_low / row - 1) < 0.02 and abs(f_high / col - 1) < 0.02  # within DTMF tolerance
            assert min(ROWS, key=lambda f: abs(f - f_low)) == row and min(COLUMNS, key=lambda f: abs(f - f_high)) == col
    assert sorted(KEYPAD) == list(range(10)) and len({dtmf_frequencies(d) for d in range(10)}) == 10


def test_write_tones_shards_decode_to_their_labels(tmp_path):
    counts = write_tones(tmp_path, train_per_class=3, val_per_class=2, shard_size=8)
    assert counts == {"train": 30, "train_shards": 4, "val": 20, "val_shards": 3}
    assert (tmp_path / "classnames.txt").read_text().split() == open_clip_names()
    assert all("{c}" in t for t in (tmp_path / "zeroshot_classification_templates.txt").read_text().splitlines())
    import soundfile as sf
    import webdataset as wds

    labels = []
    for sample in wds.WebDataset(str(tmp_path / "val" / "{0..2}.tar"), shardshuffle=False):  # clip_benchmark names
        wave, sr = sf.read(__import__("io").BytesIO(sample["flac"]))
        label = int(sample["cls"])
        labels.append(label)
        row, col = dtmf_frequencies(label)
        f_low, f_high = _two_peaks(wave, sr)
        assert sr == 8000 and abs(f_low / row - 1) < 0.02 and abs(f_high / col - 1) < 0.02
    assert sorted(labels) == sorted(list(range(10)) * 2)  # balanced held-out split


def open_clip_names():
    return ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ---- the stream ------------------------------------------------------------------------------


def _audio_shards(folder):
    """4 flac + 4 wav samples (the same 4 tones), one corrupt flac, one sample without audio."""
    rng = np.random.default_rng(1)
    waves = [dtmf_tone(d, rng)[0] for d in range(4)]
    samples = [{"__key__": f"f{d}", "flac": audio_bytes(w, 8000), "txt": f"tone {d}", "cls": d}
               for d, w in enumerate(waves)]
    samples.insert(2, {"__key__": "bad", "flac": b"fLaC not really", "txt": "broken", "cls": 0})
    samples += [{"__key__": f"w{d}", "wav": audio_bytes(w, 8000, "WAV"), "txt": f"tone {d}", "cls": d}
                for d, w in enumerate(waves)]
    samples.insert(7, {"__key__": "mute", "txt": "no audio here", "cls": 1})
    write_shards(folder, samples, shard_size=5)


def test_stream_decodes_wav_and_flac_and_counts_bad_audio(tmp_path):
    _audio_shards(tmp_path)
    cfg = DataConfig(batch_size=3, workers=0, image_key=None, audio_key="flac;wav")
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=8)
    batches = list(build_eval_loader(tmp_path, cfg, None, tok))
    keys = [k for b in batches for k in b["key"]]
    assert keys == ["f0", "f1", "f2", "f3", "w0", "w1", "w2", "w3"]
    assert sum(b["n_skipped"] for b in batches) == 2 and all("image" not in b for b in batches)
    audio = torch.cat([b["audio"] for b in batches])
    assert audio.shape == (8, *cfg.audio.shape) and audio.dtype == torch.float32
    assert torch.equal(audio[:4], audio[4:])  # PCM-16 flac and wav are the same samples: same features
    assert not torch.allclose(audio[0], audio[1])


def test_train_transform_augments_eval_transform_does_not():
    data = audio_bytes(dtmf_tone(5, np.random.default_rng(0))[0], 8000)
    cfg = AudioConfig()
    evals = AudioTransform(cfg, train=False)
    assert torch.equal(evals(data), evals(data))
    random.seed(0)
    train = AudioTransform(cfg, train=True)
    assert train(data).shape == cfg.shape and not torch.equal(train(data), train(data))


# ---- towers and model ----------------------------------------------------------------------

TINY_TEXT = {"name": "open_clip", "context_length": 8, "width": 32, "heads": 2, "layers": 1, "vocab_size": 64}
AUDIO_TOWERS = {
    "vit": {"name": "vit", "n_mels": 32, "frames": 21, "patch_size": [8, 8], "width": 32, "layers": 1, "heads": 2,
            "drop_path": 0.2},
    "hf_ast": {"name": "hf", "n_mels": 32, "frames": 21, "config": {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "patch_size": 8, "frequency_stride": 8, "time_stride": 8}},
    "hf_whisper": {"name": "hf", "model_type": "whisper", "n_mels": 32, "frames": 21, "config": {
        "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}},
}


def _audio_model_cfg(tower="vit", image=False, **kw):
    cfg = tiny_model_cfg(text=TINY_TEXT, audio=AUDIO_TOWERS[tower], **kw)
    if not image:
        cfg.image = None
    return cfg


def _batch(n, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"audio": torch.randn(n, 1, 32, 21, generator=g), "text": torch.randint(1, 64, (n, 8), generator=g)}
    if cfg.image is not None:
        batch["image"] = torch.randn(n, 3, 16, 16, generator=g)
    return batch


@pytest.mark.parametrize("tower", list(AUDIO_TOWERS))
def test_audio_towers_give_unit_features(tower):
    torch.manual_seed(0)
    model = create_model(_audio_model_cfg(tower)).eval()
    assert model.visual is None and all(k.split(".")[0] in ("text", "audio", "logit_scale")
                                        for k in model.state_dict())
    out = model(_batch(3, _audio_model_cfg(tower)))
    assert out["audio"].shape == (3, 16) and "image" not in out
    assert torch.allclose(out["audio"].norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        model.encode_audio(torch.randn(2, 1, 32, 20))
    model.set_grad_checkpointing(True)  # the tower interface holds for every tower
    assert all(n.startswith("audio.") for n in model.no_weight_decay() - {"logit_scale", "logit_bias"}
               if not n.startswith("text."))


def test_three_towers_keep_open_clip_names():
    torch.manual_seed(0)
    cfg = _audio_model_cfg(image=True)
    model = create_model(cfg)
    out = model(_batch(2, cfg))
    assert {"image", "text", "audio"} <= set(out)
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"visual", "text", "audio", "logit_scale"}
    oc = create_model(tiny_model_cfg(text=TINY_TEXT))  # the two-tower model: the same visual/text names
    assert {k for k in oc.state_dict()} == {k for k in model.state_dict() if not k.startswith("audio.")}


# ---- objectives in the gradient-cached step --------------------------------------------------

PAIRS = {
    "audio_text": (["audio", "text"], False),
    "three_pairs": ([["image", "text"], ["audio", "text"], ["image", "audio"]], True),
}


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
@pytest.mark.parametrize("pairs", list(PAIRS))
def test_gradient_cache_equals_full_batch(objective, pairs):
    modalities, image = PAIRS[pairs]
    obj = build_objective({"name": objective, "modalities": modalities})
    assert set(obj.rep_keys) == ({"image", "text", "audio"} if image else {"audio", "text"})
    kw = {"init_logit_bias": -10.0} if objective == "siglip" else {}
    cfg = _audio_model_cfg(image=image, **kw)  # drop-path 0.2 in the audio ViT: RNG replay matters
    torch.manual_seed(0)
    model = create_model(cfg).double().train()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch(16, cfg).items()}
    for k in (1, 2, 4):
        ref_loss, ref = _full_graph_grads(model, obj, batch, chunk=16 // k)
        assert any(n.startswith("audio.trunk") for n in ref)
        losses, got = _grads_after_step(copy.deepcopy(model), obj, batch, chunk=16 // k)
        assert abs(losses["loss"] - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss)), k
        _assert_close(got, ref)
    if len(obj.pairs) > 1:  # the total is the mean of the per-pair losses
        per_pair = [v for name, v in losses.items() if name.startswith("contrastive_")]
        assert len(per_pair) == 3 and abs(sum(per_pair) / 3 - losses["loss"]) < 1e-9


def test_pair_loss_equals_the_image_text_formula():
    """[audio, text] on (a, t) is the default [image, text] loss on the same tensors."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.nn.functional.normalize(torch.randn(2, 8, 4, generator=g, dtype=torch.float64), dim=-1)
    scale = {"logit_scale": torch.tensor(10.0, dtype=torch.float64)}
    audio = build_objective({"name": "infonce", "modalities": ["audio", "text"]}).cross_sample({"audio": x, "text": y},
                                                                                             scale)
    image = build_objective({"name": "infonce"}).cross_sample({"image": x, "text": y}, scale)
    assert torch.equal(audio["loss"], image["loss"])


@pytest.mark.parametrize("bad", [["audio"], ["audio", "audio"], ["audio", "speech"], [["image", "text"], ["text"]], []])
def test_bad_modalities_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="modalities"):
        build_objective({"name": "infonce", "modalities": bad})


# ---- run config --------------------------------------------------------------------------------


def test_clap_recipe_loads_and_mismatches_are_explained(tmp_path):
    from vlp.config import load_config

    recipe = os.path.join(ROOT, "configs", "quickstart", "clap_tones.yaml")
    cfg = load_config(recipe)
    assert cfg.model.image is None and cfg.data.audio.frames == cfg.model.audio["frames"] == 101
    cases = {
        "model.audio.frames=100": "data.audio makes",
        "data.audio.seconds=2.0": "model.audio.frames=201",
        "data.image_key=png": "model.image is null",
        "data.audio_key=null": "set data.audio_key",
        "objective.modalities=[image,text]": "names image",
        "eval.modality=image": "eval.modality",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_config(recipe, [override])
    from omegaconf import OmegaConf

    fixed = OmegaConf.load(recipe)
    fixed.objective = {"name": "dcl"}  # an objective without `modalities`: it reads image and text
    OmegaConf.save(fixed, tmp_path / "dcl.yaml")
    with pytest.raises(ValueError, match="objective 'dcl' reads image"):
        load_config(str(tmp_path / "dcl.yaml"))
    three = load_config(recipe, ["model.image.name=open_clip", "data.image_key=png",
                                 "objective.modalities=[[image,text],[audio,text],[image,audio]]"])
    assert three.model.image["name"] == "open_clip" and len(three.objective["modalities"]) == 3


# ---- end to end --------------------------------------------------------------------------------


# a smaller model and batch than the recipe, so the test stays short
E2E_OVERRIDES = ["optim.steps=60", "optim.warmup_steps=10", "optim.lr=3e-3", "data.batch_size=64", "data.workers=1",
                 "eval.every_steps=0", "logging.progress=false", "run.checkpoint_every=0", "model.embed_dim=32",
                 "model.audio.width=64", "model.audio.layers=2", "model.text.width=64", "model.text.layers=1"]
E2E_MIN_TOP1 = 0.5


@pytest.mark.slow
def test_clap_tones_train_then_zeroshot(tmp_path):
    """`vlp data tones` -> a short `vlp train` of the quickstart recipe -> `vlp eval zeroshot` on audio."""
    def vlp(*args):
        proc = subprocess.run([sys.executable, "-m", "vlp", *args], cwd=ROOT, env=child_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    data, run = tmp_path / "tones", tmp_path / "run"
    vlp("data", "tones", "--out", str(data))
    vlp("train", os.path.join(ROOT, "configs", "quickstart", "clap_tones.yaml"), f"run.dir={run}",
        f"data.train={data}/train", f"data.val={data}/val", *E2E_OVERRIDES)
    evals = [r for r in map(json.loads, open(run / "metrics.jsonl")) if "zeroshot_top1" in r]
    out = vlp("eval", "zeroshot", "--checkpoint", str(run), "--data", f"{data}/val", "--json")
    zs = json.loads(out.splitlines()[-1])
    assert zs["num_samples"] == 400 and abs(zs["top1"] - evals[-1]["zeroshot_top1"]) < 1e-9
    print(f"e2e zero-shot top1 {zs['top1']:.4f}")
    assert zs["top1"] >= E2E_MIN_TOP1  # chance is 0.1


# ---- spoken digits (a stand-in espeak-ng: the real one is optional) ----------------------------


def test_spoken_digits_with_a_stand_in_espeak(tmp_path, monkeypatch):
    from vlp.data.spoken_digits import write_spoken_digits

    wav = tmp_path / "clip.wav"
    wav.write_bytes(audio_bytes(dtmf_tone(3, np.random.default_rng(0))[0], 8000, "WAV"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "espeak-ng"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls.txt\ncat {wav}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")  # the stand-in first
    counts = write_spoken_digits(tmp_path / "out", voices=("en", "en+f3"), speeds=(150,), pitches=(40, 55),
                                 val_pitch=55)
    assert counts == {"train": 20, "train_shards": 1, "val": 20, "val_shards": 1}
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 40 and len(set(calls)) == 40 and "-v en+f3 -s 150 -p 55 --stdout seven" in calls
    cfg = DataConfig(batch_size=64, workers=0, image_key=None, audio_key="flac;wav",
                     audio=AudioConfig(sample_rate=8000, n_fft=256, hop_length=80))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=8)
    batch = next(iter(build_eval_loader(tmp_path / "out" / "val", cfg, None, tokenizer)))
    assert sorted(batch["label"].tolist()) == sorted(list(range(10)) * 2) and batch["audio"].shape[0] == 20
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="espeak-ng"):
        write_spoken_digits(tmp_path / "out2")


def test_verify_reports_what_the_audio_stream_skips(tmp_path, capsys):
    from vlp.cli import main
    from vlp.data.shards import verify

    _audio_shards(tmp_path)
    report = verify(tmp_path, image_key=None, audio_key="flac;wav")
    assert report["total"] == 8 and sorted(c["key"] for s in report["shards"] for c in s["corrupt"]) == ["bad", "mute"]
    assert main(["data", "verify", str(tmp_path), "--audio-key", "flac;wav", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["corrupt"] == 2


def test_export_of_an_audio_model(tmp_path):
    """safetensors and hf (the AST trunk) export; open_clip and timm refuse in one line."""
    from safetensors.torch import load_file, save_file

    from vlp.commands.export import export
    from vlp.config import load_config, save_config
    run = tmp_path / "run"
    cfg = load_config(None, ["data.workers=0", f"run.dir={run}"])
    cfg.model = _audio_model_cfg("hf_ast")
    cfg.data.image_key, cfg.data.audio_key = None, "flac;wav"
    cfg.data.audio = AudioConfig(sample_rate=8000, seconds=0.25, n_fft=200, hop_length=100, n_mels=32)  # (32, 21)
    cfg.objective = {"name": "infonce", "modalities": ["audio", "text"]}
    model = create_model(cfg.model)
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    save_config(cfg, str(run / "config.yaml"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(run / "checkpoints" / "step_00000001" / "model.safetensors"))
    (run / "checkpoints" / "latest").write_text("step_00000001")
    export(str(run), "safetensors", str(tmp_path / "st"))
    assert load_file(str(tmp_path / "st" / "model.safetensors")).keys() == model.state_dict().keys()
    with pytest.warns(UserWarning, match="text .* not a transformers model"):
        export(str(run), "hf", str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "hf")) == ["audio"]
    # the exported trunk (transformers) + head.safetensors (the projection) compute the model's encode_audio
    from transformers import AutoModel

    from vlp.runs import load_model_from_run

    hf_audio = tmp_path / "hf" / "audio"
    trunk = AutoModel.from_pretrained(str(hf_audio)).eval()
    assert type(trunk).__name__ == "ASTModel"
    head = load_file(str(hf_audio / "head.safetensors"))
    assert head.keys() == {"proj.weight"}  # proj_bias is off
    rng = np.random.default_rng(0)
    to_mel = AudioTransform(cfg.data.audio, train=False)
    mels = torch.stack([to_mel(audio_bytes(dtmf_tone(d, rng)[0], 8000)) for d in (1, 5, 9)])  # (3, 1, 32, 21)
    assert mels.shape == (3, 1, 32, 21) and mels.std() > 0.1
    _, ours, _, _ = load_model_from_run(str(run))
    with torch.no_grad():
        want = ours.encode_audio(mels)  # (3, 16)
        pooled = trunk(input_values=mels[:, 0].transpose(1, 2)).pooler_output  # AST reads (B, T, M)
        got = pooled @ head["proj.weight"].T
        unit = ours.encode_audio(mels, normalize=True)
    torch.testing.assert_close(got, want)  # float32 tolerances: the same float32 computation
    torch.testing.assert_close(torch.nn.functional.normalize(got, dim=-1), unit)
    assert float((want[0] - want[1]).norm()) > 1e-3  # the inputs give different features
    for fmt in ("open_clip", "timm"):
        with pytest.raises(ValueError, match="safetensors"):
            export(str(run), fmt, str(tmp_path / fmt))


def test_zeroshot_and_retrieval_classify_audio(tmp_path):
    """An audio-text model: zero-shot picks the audio tower by default and scores every decodable clip;
    retrieval reports audio<->text recalls; asking for the missing image tower is a one-line error."""
    from vlp.eval.common import zeroshot_modality
    from vlp.eval.retrieval import evaluate_retrieval
    from vlp.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier

    _audio_shards(tmp_path)
    data = DataConfig(batch_size=4, workers=0, image_key=None, audio_key="flac;wav",
                      audio=AudioConfig(sample_rate=8000, seconds=0.25, n_fft=200, hop_length=100, n_mels=32))
    torch.manual_seed(0)
    model = create_model(_audio_model_cfg())
    clip_tok = open_clip.tokenizer.SimpleTokenizer(context_length=8)
    tok = lambda texts: clip_tok(texts) % 64  # noqa: E731  (the tiny text tower's vocabulary)
    assert zeroshot_modality(model) == "audio"
    with pytest.raises(ValueError, match="cannot classify 'image'"):
        zeroshot_modality(model, "image")
    classifier = zeroshot_classifier(model, tok, ["zero", "one", "two", "three"], ["tone {c}"])
    zs = evaluate_zeroshot(model, build_eval_loader(tmp_path, data, None, tok), classifier, modality="audio")
    rt = evaluate_retrieval(model, build_eval_loader(tmp_path, data, None, tok), modality="audio")
    assert zs["num_samples"] == rt["num_samples"] == 8 and {"audio_to_text_R@1", "text_to_audio_R@10"} <= set(rt)
    # both against a sample-by-sample count on the model's features of the decodable clips, in the same batches
    model.eval()  # as the evaluators run it (the ViT's drop-path is on in train mode)
    audio, text, labels, keys = [], [], [], []
    with torch.no_grad():
        for batch in build_eval_loader(tmp_path, data, None, tok):
            audio.append(model.encode_audio(batch["audio"], normalize=True))
            text.append(model.encode_text(batch["text"], normalize=True))
            labels += batch["label"].tolist()
            keys += batch["key"]
    audio, text = torch.cat(audio), torch.cat(text)
    assert keys == ["f0", "f1", "f2", "f3", "w0", "w1", "w2", "w3"] and labels == [0, 1, 2, 3] * 2
    bounds, n, uncertain = count_zeroshot(audio, classifier, labels)
    assert n == 8 and uncertain == 0
    for name, b in bounds.items():
        assert_within(zs[name], b, name)
    assert zs["top5"] == 1.0  # top-min(5, 4): every class
    for way, (q, k) in {"audio_to_text": (audio, text), "text_to_audio": (text, audio)}.items():
        recalls, uncertain = count_recall(q, k)
        assert uncertain == 0
        for at, b in recalls.items():
            assert_within(rt[f"{way}_R@{at}"], b, f"{way}_R@{at}")
    assert rt["audio_to_text_R@10"] == 1.0  # 8 candidates: every positive is within the top 10
