"""Teacher throughput, real-size FLOPs, and duration batching vs fixed-size batching, one run.

    python bench/teacher.py                       # CPU (and CUDA too when present), ~2 min on 2 cores
    python bench/teacher.py --minutes 4 --batch-seconds 120 --device cuda
    python bench/teacher.py --teachers resemblyzer,crepe --nn-minutes 1   # the pretrained teachers only

Segment lengths are drawn from a log-normal (median 8 s, sigma 0.7) clipped to 1..30 s,
a typical spread for segments cut at 30 s from speech and audio corpora.

Prints
  (1) per teacher (mfcc, fbank, small random-init WavLM / HuBERT / Dasheng, the pretrained
      resemblyzer and crepe (tiny) from their wheels): frames/s and x real time with duration
      batching, and the ratio against a reference run in the same process on the same batches
      (lhotse's Kaldi layers for the features, transformers' own model for WavLM / HuBERT,
      resemblyzer's librosa mel + VoiceEncoder LSTM per utterance on the same 1.6 s windows,
      torchcrepe's Crepe module on the same frames; Dasheng's package does not import without
      torchaudio);
  (2) GFLOP per audio second of the real-size teachers (analytic, 10 s utterances) and the
      x real time bound of an 800 TFLOP/s bf16 GPU;
  (3) padding waste (padded samples / samples computed) of duration batching (sort + cut by
      padded seconds, as the teacher stage does) vs fixed-size batches of the same mean
      audio per batch, for several Ray batch sizes, and the measured throughput ratio
      duration / fixed for mfcc and the small WavLM.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings

import numpy as np
import torch

from spear.models.teachers import DashengConfig, DashengEncoder, Teacher, save_dasheng_checkpoint
from spear.stages.teacher_loading import load_teacher
from spear.config import TeacherConfig
from spear.stages.batching import plan_subbatches

SR = 16000


def segment_lengths(minutes: float, seed: int) -> np.ndarray:
    """Samples per segment, log-normal seconds (median 8 s, sigma 0.7) clipped to [1, 30], summing to ~minutes."""
    rng = np.random.default_rng(seed)
    out, total = [], 0.0
    while total < minutes * 60:
        s = float(np.clip(rng.lognormal(math.log(8.0), 0.7), 1.0, 30.0))
        out.append(int(s * SR))
        total += s
    return np.array(out, dtype=np.int64)


def make_audio(lengths: np.ndarray, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(n), generator=g) * 0.1 for n in lengths]


def duration_batches(lengths: np.ndarray, rows: int, batch_seconds: float) -> list[np.ndarray]:
    """As the teacher stage: Ray batches of `rows` in arrival order, each sorted and cut by padded seconds."""
    out = []
    for start in range(0, len(lengths), rows):
        idx = np.arange(start, min(start + rows, len(lengths)))
        out += [idx[b] for b in plan_subbatches(lengths[idx], int(batch_seconds * SR))]
    return out


def fixed_batches(lengths: np.ndarray, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + size, len(lengths))) for s in range(0, len(lengths), size)]


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - float(lengths.sum()) / computed


def pad(audio: list[torch.Tensor], idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([audio[i].numel() for i in idx])
    x = torch.zeros(len(idx), int(lens.max()))
    for j, i in enumerate(idx):
        x[j, : lens[j]] = audio[i]
    return x, lens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


REPEAT = 3


def time_run(fn, audio, batches, device) -> tuple[float, int]:
    """Best of REPEAT passes: seconds to run fn over all batches (inputs padded beforehand), frames produced."""
    inputs = [pad(audio, b) for b in batches]
    fn(*inputs[0])  # warm-up
    best, frames = float("inf"), 0
    for _ in range(REPEAT):  # the best pass: other processes on a shared machine only ever slow a pass down
        sync(device)
        t0 = time.perf_counter()
        frames = 0
        for x, lens in inputs:
            frames += int(fn(x.to(device), lens))
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, frames


# ----------------------------------------------------------------------------- small random checkpoints


def small_checkpoints(root: str) -> dict[str, TeacherConfig]:
    import transformers

    torch.manual_seed(0)
    small = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                 conv_dim=(128,) * 7, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=8,
                 feat_extract_norm="layer", do_stable_layer_norm=True)
    transformers.WavLMModel(transformers.WavLMConfig(**small)).save_pretrained(os.path.join(root, "wavlm"))
    transformers.HubertModel(transformers.HubertConfig(**small)).save_pretrained(os.path.join(root, "hubert"))
    save_dasheng_checkpoint(DashengEncoder(DashengConfig(embed_dim=256, depth=4, num_heads=4)),
                            os.path.join(root, "dasheng.pt"))
    return {"wavlm": TeacherConfig(kind="wavlm", path=os.path.join(root, "wavlm"), layer=4),
            "hubert": TeacherConfig(kind="hubert", path=os.path.join(root, "hubert"), layer=4),
            "dasheng": TeacherConfig(kind="dasheng", path=os.path.join(root, "dasheng.pt"))}


def reference_fn(kind: str, teacher: Teacher, device: torch.device):
    """The same computation by the reference implementation, or None."""
    if kind in ("mfcc", "fbank"):
        try:
            from lhotse.features.kaldi.layers import Wav2LogFilterBank, Wav2MFCC
        except ImportError:
            return None, "lhotse not installed"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = (Wav2MFCC(snip_edges=True, high_freq=0.0) if kind == "mfcc"
                   else Wav2LogFilterBank(snip_edges=True, num_filters=128, high_freq=0.0)).to(device)

        def run(x, lens):
            with torch.inference_mode():
                return mod(x).shape[1] * x.shape[0]
        return run, "lhotse " + type(mod).__name__ + (" (no deltas)" if kind == "mfcc" else "")
    if kind in ("wavlm", "hubert"):
        model = teacher.model  # the same weights; truncated to the chosen layer, which is the last here

        def run(x, lens):
            mask = (torch.arange(x.shape[1], device=x.device)[None] < lens.to(x.device)[:, None]).long()
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hs = model(x, attention_mask=mask, output_hidden_states=True).hidden_states
            return int(model._get_feat_extract_output_lengths(lens).sum()) if hs is not None else 0
        return run, "transformers model, output_hidden_states"
    if kind == "resemblyzer":
        try:
            from resemblyzer import VoiceEncoder, audio as rz_audio
        except ImportError:
            return None, "resemblyzer's audio module needs librosa + webrtcvad (test extra)"
        from spear.models.teachers.resemblyzer import window_plan
        enc = VoiceEncoder(device=device, verbose=False).eval()

        def run(x, lens):  # the package's inference: one utterance at a time, numpy mel, then the LSTM
            frames = 0
            for w, n in zip(x.cpu().numpy(), lens.tolist()):
                mel = torch.from_numpy(rz_audio.wav_to_mel_spectrogram(
                    rz_audio.normalize_volume(w[:n], -30, increase_only=True).astype(np.float32))).to(device)
                k = int(window_plan(torch.tensor(mel.shape[0])))
                mel = torch.nn.functional.pad(mel, (0, 0, 0, 80 * (k - 1) + 160 - mel.shape[0]))
                with torch.inference_mode():
                    enc.lstm(torch.stack([mel[80 * i: 80 * i + 160] for i in range(k)]))
                frames += teacher.num_frames_for(n)
            return frames
        return run, "resemblyzer librosa mel + VoiceEncoder.lstm, per utterance"
    if kind == "crepe":
        from spear.models.teachers.crepe import torchcrepe_reference
        ref = torchcrepe_reference(teacher.net.capacity).to(device)

        def run(x, lens):  # the package's module on the same (already framed) windows, up to block 6
            nf = teacher.num_frames_for(lens)
            frames = teacher.frames(x, lens.to(x.device))
            keep = torch.arange(frames.shape[1], device=x.device)[None] < nf.to(x.device)[:, None]
            flat = frames[keep]
            with torch.inference_mode():
                for i in range(0, flat.shape[0], teacher.frames_per_pass):
                    ref.layer(ref.embed(flat[i: i + teacher.frames_per_pass]), ref.conv6, ref.conv6_BN)
            return int(nf.sum())
        return run, "torchcrepe's Crepe module (by file path) on the same frames"
    return None, "dasheng package needs torchaudio"


def bench_throughput(args, device: torch.device, cfgs: dict[str, TeacherConfig]) -> list[tuple]:
    rows = []
    for kind, minutes in (("mfcc", args.minutes), ("fbank", args.minutes), ("wavlm", args.nn_minutes),
                          ("hubert", args.nn_minutes), ("dasheng", args.nn_minutes),
                          ("resemblyzer", args.nn_minutes), ("crepe", args.nn_minutes)):
        if args.teachers and kind not in args.teachers:
            continue
        lengths = segment_lengths(minutes, args.seed)
        audio = make_audio(lengths, args.seed)
        batches = duration_batches(lengths, args.rows, args.batch_seconds)
        cfg = cfgs[kind] if kind in cfgs else TeacherConfig(kind=kind)
        teacher = load_teacher(cfg, device=device)
        secs, frames = time_run(lambda x, lens: int(teacher(x, lens).num_frames.sum()), audio, batches, device)
        audio_s = lengths.sum() / SR
        ref, ref_name = reference_fn(kind, teacher, device)
        ratio = "n/a"
        if ref is not None:
            ref_secs, _ = time_run(ref, audio, batches, device)
            ratio = f"{ref_secs / secs:.2f}"
        params = sum(p.numel() for p in teacher.parameters())
        rows.append((kind, f"{params / 1e6:.1f}M", teacher.dim, f"{teacher.frame_rate:g}", f"{frames / secs:,.0f}",
                     f"{audio_s / secs:,.1f}", ratio, ref_name))
    return rows


# ----------------------------------------------------------------------------- FLOPs of the real sizes


def hf_gflop_per_second(hidden, layers, ffn, conv_dim=(512,) * 7, kernels=(10, 3, 3, 3, 3, 2, 2),
                        strides=(5, 2, 2, 2, 2, 2, 2), pos_k=128, pos_groups=16, utt_s=10.0) -> float:
    flops, rate, cin = 0.0, float(SR), 1
    for c, k, s in zip(conv_dim, kernels, strides):
        rate /= s
        flops += 2 * k * cin * c * rate
        cin = c
    T = rate * utt_s  # frames per utterance
    flops += 2 * cin * hidden * rate  # feature projection
    flops += 2 * pos_k * hidden * hidden / pos_groups * rate
    flops += layers * rate * (2 * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * T * hidden)
    return flops / 1e9


def dasheng_gflop_per_second(dim, depth, utt_s=10.0, chunk=252) -> float:
    rate = SR / 640
    T = min(rate * utt_s, chunk)
    flops = 2 * 64 * 4 * dim * rate + depth * rate * (2 * 12 * dim * dim + 4 * T * dim)
    return flops / 1e9


def flops_table() -> list[tuple]:
    peak = 800e12
    entries = [
        ("WavLM Large, layer 21 (SPEAR speech)", hf_gflop_per_second(1024, 21, 4096)),
        ("WavLM Large, all 24 layers", hf_gflop_per_second(1024, 24, 4096)),
        ("HuBERT Large, all 24 layers", hf_gflop_per_second(1024, 24, 4096)),
        ("WavLM Base+ / HuBERT Base, 12 layers", hf_gflop_per_second(768, 12, 3072)),
        ("Dasheng base (768 x 12)", dasheng_gflop_per_second(768, 12)),
        ("Dasheng 0.6B (1280 x 32)", dasheng_gflop_per_second(1280, 32)),
        ("Dasheng 1.2B (1536 x 40, SPEAR audio)", dasheng_gflop_per_second(1536, 40)),
    ]
    return [(name, f"{g:.1f}", f"{peak / (g * 1e9):,.0f}") for name, g in entries]


# ----------------------------------------------------------------------------- batching


def bench_batching(args, device: torch.device, cfgs: dict[str, TeacherConfig]) -> tuple[list[tuple], list[tuple]]:
    lengths = segment_lengths(args.padding_minutes, args.seed + 1)
    mean_s = lengths.mean() / SR
    fixed_k = max(1, round(args.batch_seconds / mean_s))
    waste_rows = []
    for rows in (8, 24, 64, 256):
        d = duration_batches(lengths, rows, args.batch_seconds)
        waste_rows.append((f"duration, {rows} rows per Ray batch", f"{padding_waste(lengths, d):.1%}", len(d),
                           f"{len(lengths) / len(d):.1f}"))
    f = fixed_batches(lengths, fixed_k)
    waste_rows.append((f"fixed {fixed_k} per batch (same mean audio)", f"{padding_waste(lengths, f):.1%}", len(f),
                       f"{len(lengths) / len(f):.1f}"))

    speed_rows = []
    for kind, minutes in (("mfcc", args.minutes), ("wavlm", args.nn_minutes)):
        ls = segment_lengths(minutes, args.seed + 2)
        k = max(1, round(args.batch_seconds / (ls.mean() / SR)))
        audio = make_audio(ls, args.seed + 2)
        teacher = load_teacher(cfgs[kind] if kind in cfgs else TeacherConfig(kind=kind), device=device)
        fn = lambda x, lens: int(teacher(x, lens).num_frames.sum())  # noqa: E731
        db = duration_batches(ls, args.rows, args.batch_seconds)
        fb = fixed_batches(ls, k)
        t_d, _ = time_run(fn, audio, db, device)
        t_f, _ = time_run(fn, audio, fb, device)
        audio_s = ls.sum() / SR
        wd, wf = padding_waste(ls, db), padding_waste(ls, fb)
        speed_rows.append((kind, f"{audio_s / t_d:,.1f}", f"{audio_s / t_f:,.1f}", f"{t_f / t_d:.2f}",
                           f"{(1 - wd) / (1 - wf):.2f}", f"{wd:.1%}", f"{wf:.1%}"))
    return waste_rows, speed_rows


def table(title: str, header: tuple, rows: list[tuple]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  " + " | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  " + "-+-".join("-" * w for w in widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="audio for the mfcc / fbank throughput runs")
    ap.add_argument("--nn-minutes", type=float, default=0.5, help="audio for the neural teachers' runs")
    ap.add_argument("--padding-minutes", type=float, default=60.0, help="audio for the padding-waste statistics")
    ap.add_argument("--batch-seconds", type=float, default=60.0, help="padded audio seconds per teacher batch")
    ap.add_argument("--rows", type=int, default=48, help="rows per Ray batch (the stage sorts within one; "
                    "plan_teacher_pool's default for 60 s)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="all: CPU, and CUDA when present")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes per measurement (the best counts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teachers", type=lambda v: [k.strip() for k in v.split(",") if k.strip()], default=None,
                    help="comma-separated kinds: only these in (1), and (2) / (3) left out (e.g. resemblyzer,crepe)")
    args = ap.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
          f"batch_seconds {args.batch_seconds:g}, {args.rows} rows per Ray batch")
    with tempfile.TemporaryDirectory() as root:
        cfgs = small_checkpoints(root)
        for device in devices:
            if device.type == "cuda":  # bf16 autocast, as in production
                cfgs = {k: v.model_copy(update={"dtype": "bfloat16"}) for k, v in cfgs.items()}
            table(f"(1) throughput on {device.type} (small random-init WavLM/HuBERT: 256-d x 4 layers, conv 128 ch; "
                  f"Dasheng: 256-d x 4)",
                  ("teacher", "params", "dim", "Hz", "frames/s", "x real time", "ref time / ours", "reference"),
                  bench_throughput(args, device, cfgs))
        if args.teachers:
            return
        table("(2) real-size teachers: analytic GFLOP per audio second (10 s utterances)",
              ("teacher", "GFLOP / audio s", "x real time bound @ 800 TFLOP/s"), flops_table())
        for device in devices:
            waste, speed = bench_batching(args, device, cfgs)
            table(f"(3a) padding waste, {args.padding_minutes:g} min of log-normal segments, "
                  f"{args.batch_seconds:g} s per teacher batch", ("batching", "padding waste", "batches", "mean size"),
                  waste)
            table(f"(3b) measured on {device.type}: duration batching vs fixed-size batches",
                  ("teacher", "x RT duration", "x RT fixed", "duration / fixed", "if cost = padded samples",
                   "waste duration", "waste fixed"),
                  speed)


if __name__ == "__main__":
    main()
