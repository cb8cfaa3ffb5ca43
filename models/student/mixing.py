"""SPEAR's token mixing: mix another utterance of the batch into part of a waveform and
replace the targets there, cell by cell, with the mixed-in utterance's tokens.

For each reference utterance b, with probability ``prob``:

1. pick a partner j != b uniformly among the batch's other non-empty utterances;
2. a region of ``n = round(u * L_b)`` samples, u ~ U[min_region, max_region] (at most the
   partner's length), at a uniform offset ``s`` in the reference and ``s'`` in the partner;
3. an SNR from ``speech_snr_db`` if the partner is speech, else ``noise_snr_db``;
4. with E_ref = sum of ref[s : s + n]^2 and E_mix = sum of partner[s' : s' + n]^2, the partner is
   scaled by ``gain = sqrt(E_ref / (E_mix * 10^(SNR / 10)))`` and added:
   ``out[s : s + n] = ref[s : s + n] + gain * partner[s' : s' + n]``; samples outside the
   region are untouched;
5. ``g`` is the amplitude of the scaled partner *relative to the reference* in the region,
   ``g = sqrt(gain^2 E_mix / E_ref) = 10^(-SNR / 20)``, and every (frame, codebook) target
   inside the region is replaced by the partner's token with probability
   ``p = g^2 / (1 + g^2) = 1 / (1 + 10^(SNR / 10))``, the partner's share of the mixture's
   energy (0.5 at 0 dB, 0.24 at 5 dB, 0.76 at -5 dB).

A teacher frame k (rate r) covers [k / r, (k + 1) / r) s; it is inside the region when its
centre (k + 0.5) / r lies in [s, s + n) / 16000, and its partner token is the partner's frame
at the same place in the partner's audio, floor(((k + 0.5) / r - s / sr + s' / sr) * r).
A target is replaced only where both it and the partner's token exist (not -100): speech
utterances keep carrying no audio-teacher targets. The mixed-in audio always comes from
the original batch (mixing does not chain). Regions where either signal is silent
(mean square < 1e-10) are skipped: no gain gives the drawn SNR there.

Example::

    >>> import torch
    >>> from spear.models.student.mixing import mix_batch
    >>> wavs = torch.randn(2, 16000) * 0.1
    >>> targets = {"speech": torch.zeros(2, 49, 16, dtype=torch.long)}
    >>> targets["speech"][1] = 1
    >>> g = torch.Generator().manual_seed(0)
    >>> mixed, new_targets, info = mix_batch(wavs, torch.tensor([16000, 16000]), targets, {"speech": 50.0},
    ...                                      ["speech", "speech"], g, prob=1.0)
    >>> info.partner.tolist()
    [1, 0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from .targets import IGNORE_INDEX

SILENCE_MEAN_SQUARE = 1e-10  # -100 dBFS


@dataclass
class MixInfo:
    """What :func:`mix_batch` did, per reference utterance ([B] tensors; -1 / 0 / nan where not mixed).

    ``partner``: index of the mixed-in utterance; ``start`` / ``length``: the region in the
    reference (samples); ``partner_start``: where the mixed-in audio was taken from;
    ``snr_db``; ``gain``: the multiplier applied to the partner's samples; ``g``: the
    partner's amplitude relative to the reference in the region; ``replace_prob``:
    g^2 / (1 + g^2); ``region``: per teacher, [B, T] bool, the target frames inside the
    region; ``replaced``: per teacher, [B, T, C] bool, the targets that were replaced.
    """

    partner: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    partner_start: torch.Tensor
    snr_db: torch.Tensor
    gain: torch.Tensor
    g: torch.Tensor
    replace_prob: torch.Tensor
    region: dict[str, torch.Tensor]
    replaced: dict[str, torch.Tensor]


def _uniform(lo: float, hi: float, generator: Optional[torch.Generator]) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(n: int, generator: Optional[torch.Generator]) -> int:
    """Uniform in [0, n) (0 when n <= 1)."""
    return int(torch.randint(max(n, 1), (), generator=generator))


def mix_batch(wavs: torch.Tensor, wav_lengths: torch.Tensor, targets: Mapping[str, torch.Tensor],
              frame_rates: Mapping[str, float], domains: Sequence[str],
              generator: Optional[torch.Generator] = None, *, prob: float = 0.4, min_region: float = 0.2,
              max_region: float = 0.5, speech_snr_db: tuple[float, float] = (-5.0, 5.0),
              noise_snr_db: tuple[float, float] = (5.0, 20.0), sample_rate: int = 16000,
              target_lengths: Optional[Mapping[str, torch.Tensor]] = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], MixInfo]:
    """Token mixing on a batch of 16 kHz waveforms [B, S] and their per-teacher targets.

    ``targets[name]`` is [B, T_name, C_name] at the teacher's own rate ``frame_rates[name]``,
    -100 where there is no target; ``target_lengths[name]`` [B] (optional) marks frames at or
    past an utterance's length as having no target too, for targets padded with anything else
    (0 for an utterance without this teacher's tokens); ``domains[b]`` is "speech" or "audio".
    ``prob``, ``min_region``, ``max_region``, ``speech_snr_db`` and ``noise_snr_db`` are the
    settings of the module docstring; the defaults are SPEAR's (the fields of
    ``spear.config.MixingConfig``, which the train stage passes on). ``generator`` (a CPU
    ``torch.Generator``) makes the draws reproducible. Returns the mixed waveforms (a new
    tensor), new int64 targets and a :class:`MixInfo`.
    """
    if wavs.dim() != 2:
        raise ValueError(f"wavs must be [B, S], got {tuple(wavs.shape)}")
    B = wavs.shape[0]
    lengths = torch.as_tensor(wav_lengths, dtype=torch.long).cpu()
    if lengths.shape != (B,) or len(domains) != B:
        raise ValueError(f"wav_lengths and domains need one entry per utterance ({B})")
    if set(targets) - set(frame_rates):
        raise ValueError(f"no frame rate for teacher(s) {sorted(set(targets) - set(frame_rates))}")
    bad = sorted({d for d in domains} - {"speech", "audio"})
    if bad:
        raise ValueError(f"domains must be 'speech' or 'audio', got {bad}")

    out = wavs.clone()
    new_targets = {name: t.long().clone() for name, t in targets.items()}
    orig_targets = {name: t.long() for name, t in targets.items()}
    for name, n_frames in (target_lengths or {}).items():  # past the length = no target
        t = orig_targets[name]
        beyond = torch.arange(t.shape[1], device=t.device)[None, :] >= torch.as_tensor(n_frames).to(t.device)[:, None]
        orig_targets[name] = t.masked_fill(beyond.unsqueeze(-1), IGNORE_INDEX)
    info = MixInfo(partner=torch.full((B,), -1, dtype=torch.long), start=torch.zeros(B, dtype=torch.long),
                   length=torch.zeros(B, dtype=torch.long), partner_start=torch.zeros(B, dtype=torch.long),
                   snr_db=torch.full((B,), math.nan), gain=torch.zeros(B), g=torch.zeros(B),
                   replace_prob=torch.zeros(B),
                   region={n: torch.zeros(t.shape[:2], dtype=torch.bool) for n, t in targets.items()},
                   replaced={n: torch.zeros(t.shape, dtype=torch.bool) for n, t in targets.items()})
    candidates = [j for j in range(B) if int(lengths[j]) > 0]

    for b in range(B):
        L = int(lengths[b])
        if float(torch.rand((), generator=generator)) >= prob or L == 0:
            continue
        others = [j for j in candidates if j != b]
        if not others:
            continue
        j = others[_randint(len(others), generator)]
        Lj = int(lengths[j])
        n = min(max(1, round(_uniform(min_region, max_region, generator) * L)), Lj, L)
        s = _randint(L - n + 1, generator)
        sj = _randint(Lj - n + 1, generator)
        lo, hi = speech_snr_db if domains[j] == "speech" else noise_snr_db
        snr = _uniform(lo, hi, generator)

        ref, src = wavs[b, s:s + n].double(), wavs[j, sj:sj + n].double()
        e_ref, e_src = float(ref.pow(2).sum()), float(src.pow(2).sum())
        if e_ref / n < SILENCE_MEAN_SQUARE or e_src / n < SILENCE_MEAN_SQUARE:
            continue
        gain = math.sqrt(e_ref / (e_src * 10.0 ** (snr / 10.0)))
        g = 10.0 ** (-snr / 20.0)
        p = g * g / (1.0 + g * g)
        out[b, s:s + n] = (ref + gain * src).to(out.dtype)

        info.partner[b], info.start[b], info.length[b], info.partner_start[b] = j, s, n, sj
        info.snr_db[b], info.gain[b], info.g[b], info.replace_prob[b] = snr, gain, g, p

        for name, tgt in orig_targets.items():
            r = float(frame_rates[name])
            T = tgt.shape[1]
            centre = (torch.arange(T, dtype=torch.float64) + 0.5) / r  # seconds
            inside = (centre >= s / sample_rate) & (centre < (s + n) / sample_rate)
            k = inside.nonzero().flatten()
            if k.numel() == 0:
                continue
            kj = torch.floor((centre[k] - s / sample_rate + sj / sample_rate) * r).long()
            ok = (kj >= 0) & (kj < T)
            k, kj = k[ok], kj[ok]
            mine = tgt[b, k.to(tgt.device)]  # [K, C]
            theirs = tgt[j, kj.to(tgt.device)]
            draw = torch.rand(mine.shape, generator=generator).to(tgt.device) < p
            swap = draw & (mine != IGNORE_INDEX) & (theirs != IGNORE_INDEX)
            kd = k.to(tgt.device)
            new_targets[name][b, kd] = torch.where(swap, theirs, new_targets[name][b, kd])
            info.region[name][b, k] = True
            info.replaced[name][b, k] = swap.cpu()
    return out, new_targets, info
