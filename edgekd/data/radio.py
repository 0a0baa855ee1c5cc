"""Automatic modulation recognition datasets: a synthetic RadioML-style generator and two file loaders.

- ``radio-synthetic``: RadioML 2016.10a-style frames generated in numpy (no download), after
  O'Shea & West, Radio Machine Learning Dataset Generation with GNU Radio, 2016.
- ``rml2016`` (``rml2016.10a``): the published ``RML2016.10a_dict.pkl`` (same paper).
- ``rml2018`` (``rml2018.01a``): the published ``GOLD_XYZ_OSC.0001_1024.hdf5``, from O'Shea, Roy,
  Clancy, Over-the-Air Deep Learning Based Radio Signal Classification, 2018.

Every source returns frames of shape (2, L) (I, Q) passed through
:func:`edgekd.data.base.normalise_frames`, with their class and SNR.
"""

from __future__ import annotations

import codecs
import functools
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np

from edgekd.data.base import (
    DATASETS,
    MIN_FRAME_LENGTH,
    NORMALISATION,
    ArrayDataset,
    DatasetMeta,
    check_memory,
    normalise_frames,
    require_finite,
    seeded_rng,
    strata,
    stratified_pick,
)
from edgekd.errors import DataError
from edgekd.hashing import sha256_file, sha256_json
from edgekd.recipe import DataSpec

MODULATIONS = ("8PSK", "AM-DSB", "AM-SSB", "BPSK", "CPFSK", "GFSK", "PAM4", "QAM16", "QAM64", "QPSK", "WBFM")
SNR_LEVELS = tuple(range(-20, 20, 2))

# Class order of RML2018.01a's one-hot Y as commonly used (the classes.txt shipped with some copies
# of the dataset lists another order that does not match Y).
RML2018_CLASSES = (
    "OOK", "4ASK", "8ASK", "BPSK", "QPSK", "8PSK", "16PSK", "32PSK", "16APSK", "32APSK", "64APSK",
    "128APSK", "16QAM", "32QAM", "64QAM", "128QAM", "256QAM", "AM-SSB-WC", "AM-SSB-SC", "AM-DSB-WC",
    "AM-DSB-SC", "FM", "GMSK", "OQPSK",
)  # fmt: skip

GENERATOR_VERSION = 1  # bump when the synthetic signal chain changes (invalidates cached fingerprints)

# Transmitter.
SAMPLES_PER_SYMBOL = 8
RRC_ROLLOFF = 0.35
RRC_SPAN_SYMBOLS = 8
GAUSSIAN_BT = 0.35
GAUSSIAN_SPAN_SYMBOLS = 4
CPFSK_INDEX = 0.5  # modulation index h: phase step of pi*h per symbol
GFSK_INDEX = 1.0
AUDIO_BAND = (0.002, 0.03)  # message band in cycles/sample (0.4-6 kHz at 200 kHz sampling)
AUDIO_TONES = 3
AM_DEPTH = (0.5, 1.0)
WBFM_DEVIATION = (0.15, 0.35)  # peak frequency deviation in cycles/sample (75 kHz at 220 kHz ~ 0.34)

# Channel (after the GNU Radio dynamic channel model used for RML2016.10a).
MAX_CFO = 0.0025  # cycles/sample (500 Hz at 200 kHz)
MAX_RATE_OFFSET = 1e-3  # relative sample-rate offset
MULTIPATH_DELAYS = (0, 1, 2)  # samples
MULTIPATH_PROFILE = (1.0, 0.4, 0.15)  # relative tap powers
MAX_RICIAN_K = 10.0  # K = 0 is Rayleigh
MARGIN = 64  # samples generated beyond each end of a frame (filter transients)
WINDOW_SLACK = 4 * SAMPLES_PER_SYMBOL  # random frame start range, so frames start anywhere in a symbol

HDF5_BLOCK = 4096  # rows read from an HDF5 dataset at a time
SNR_LIMIT_DB = 1000  # a stored SNR beyond +-this is not an SNR (and would not fit the int16 kept)

# Memory estimates (bytes) checked before a dataset is built, see edgekd.data.base.check_memory.
# The kept float32 frames exist about this many times at once (per-source arrays, concatenation,
# normalisation, the train/val subsets):
FRAME_COPIES = 4
# The synthetic generator holds about this many complex128 arrays of twice the generation length
# (FFT filtering pads to a power of two) per modulation while it works:
SYNTHETIC_WORKING_ARRAYS = 6
# An RML2016.10a pickle is float32 arrays, so its size is about one copy of the frames.
PICKLE_COPIES = FRAME_COPIES + 1

Modulator = Callable[[int, int, np.random.Generator], np.ndarray]


# --------------------------------------------------------------------------- signal processing helpers


def rrc_taps(rolloff: float, sps: int, span: int) -> np.ndarray:
    """Root-raised-cosine pulse, ``span`` symbols long at ``sps`` samples per symbol, unit energy."""
    t = np.arange(-span * sps // 2, span * sps // 2 + 1) / sps
    taps = np.empty_like(t)
    centre = t == 0
    edge = np.isclose(np.abs(t), 1 / (4 * rolloff))
    rest = ~(centre | edge)
    tr = t[rest]
    taps[rest] = (
        np.sin(np.pi * tr * (1 - rolloff)) + 4 * rolloff * tr * np.cos(np.pi * tr * (1 + rolloff))
    ) / (np.pi * tr * (1 - (4 * rolloff * tr) ** 2))
    taps[centre] = 1 - rolloff + 4 * rolloff / np.pi
    taps[edge] = (rolloff / np.sqrt(2)) * (
        (1 + 2 / np.pi) * np.sin(np.pi / (4 * rolloff)) + (1 - 2 / np.pi) * np.cos(np.pi / (4 * rolloff))
    )
    return taps / np.sqrt(np.sum(taps**2))


def gaussian_taps(bt: float, sps: int, span: int) -> np.ndarray:
    """Gaussian frequency-shaping filter of bandwidth-time product ``bt``, summing to 1."""
    t = np.arange(-span * sps // 2, span * sps // 2 + 1) / sps
    taps = np.exp(-2 * (np.pi * bt * t) ** 2 / np.log(2))
    return taps / taps.sum()


def fir(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Filter each row of ``x`` with ``taps`` (FFT convolution), centred: output length = input length."""
    n = x.shape[-1] + len(taps) - 1
    size = 1 << (n - 1).bit_length()
    out = np.fft.ifft(np.fft.fft(x, size, axis=-1) * np.fft.fft(taps, size), axis=-1)
    delay = (len(taps) - 1) // 2
    out = out[..., delay : delay + x.shape[-1]]
    return out.real if np.isrealobj(x) else out


def analytic(x: np.ndarray) -> np.ndarray:
    """Analytic signal x + j·Hilbert(x) of each real row, via the FFT (negative frequencies removed)."""
    n = x.shape[-1]
    gain = np.zeros(n)
    gain[0] = 1.0
    gain[1 : (n + 1) // 2] = 2.0
    if n % 2 == 0:
        gain[n // 2] = 1.0
    return np.fft.ifft(np.fft.fft(x, axis=-1) * gain, axis=-1)


def _rms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.abs(x) ** 2, axis=-1, keepdims=True))


_RRC = rrc_taps(RRC_ROLLOFF, SAMPLES_PER_SYMBOL, RRC_SPAN_SYMBOLS)
_GAUSSIAN = gaussian_taps(GAUSSIAN_BT, SAMPLES_PER_SYMBOL, GAUSSIAN_SPAN_SYMBOLS)


# --------------------------------------------------------------------------- modulators


def _square_qam(levels: int) -> np.ndarray:
    axis = np.arange(-(levels - 1), levels, 2, dtype=float)
    return (axis[:, None] + 1j * axis[None, :]).ravel()


def _unit_power(points: np.ndarray) -> np.ndarray:
    points = points.astype(complex)
    return points / np.sqrt(np.mean(np.abs(points) ** 2))


# Symbols are drawn uniformly and independently, so the bit-to-symbol labelling (Gray or not) does not
# change the waveform; only the point set matters.
CONSTELLATIONS = {
    "BPSK": _unit_power(np.array([-1.0, 1.0])),
    "QPSK": _unit_power(np.exp(1j * (np.pi / 4 + np.pi / 2 * np.arange(4)))),
    "8PSK": _unit_power(np.exp(2j * np.pi * np.arange(8) / 8)),
    "PAM4": _unit_power(np.array([-3.0, -1.0, 1.0, 3.0])),
    "QAM16": _unit_power(_square_qam(4)),
    "QAM64": _unit_power(_square_qam(8)),
}


def _n_symbols(length: int) -> int:
    return -(-length // SAMPLES_PER_SYMBOL) + 1


def _linear(points: np.ndarray) -> Modulator:
    """Random symbols from ``points``, RRC pulse shaped."""

    def modulate(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        symbols = points[rng.integers(len(points), size=(n, _n_symbols(length)))]
        impulses = np.zeros((n, symbols.shape[1] * SAMPLES_PER_SYMBOL), dtype=complex)
        impulses[:, ::SAMPLES_PER_SYMBOL] = symbols
        return fir(impulses, _RRC)[:, :length]

    return modulate


def _continuous_phase(index: float, shaping: np.ndarray | None) -> Modulator:
    """Binary continuous-phase FSK with modulation ``index``; Gaussian-shaped frequency pulse for GFSK."""

    def modulate(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        bits = 2.0 * rng.integers(2, size=(n, _n_symbols(length))) - 1.0
        frequency = np.repeat(bits, SAMPLES_PER_SYMBOL, axis=1)
        if shaping is not None:
            frequency = fir(frequency, shaping)
        phase = np.pi * index / SAMPLES_PER_SYMBOL * np.cumsum(frequency, axis=1)
        return np.exp(1j * phase[:, :length])

    return modulate


def audio_message(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Band-limited stand-in for speech/music: a few random tones plus low-pass noise, peak 1."""
    low, high = AUDIO_BAND
    t = np.arange(length)
    freqs = rng.uniform(low, high, (n, AUDIO_TONES, 1))
    amps = rng.uniform(0.2, 1.0, (n, AUDIO_TONES, 1))
    phases = rng.uniform(0, 2 * np.pi, (n, AUDIO_TONES, 1))
    tones = np.sum(amps * np.cos(2 * np.pi * freqs * t + phases), axis=1)
    spectrum = np.fft.rfft(rng.standard_normal((n, length)), axis=1)
    spectrum[:, np.fft.rfftfreq(length) > high] = 0
    noise = np.fft.irfft(spectrum, length, axis=1)
    message = tones + 0.5 * noise * _rms(tones) / np.maximum(_rms(noise), 1e-12)
    return message / np.max(np.abs(message), axis=1, keepdims=True)


def _am_dsb(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Double-sideband AM with carrier, random modulation depth."""
    depth = rng.uniform(*AM_DEPTH, (n, 1))
    return (1.0 + depth * audio_message(n, length, rng)).astype(complex)


def _am_ssb(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Upper-sideband suppressed-carrier AM (analytic signal of the message)."""
    return analytic(audio_message(n, length, rng))


def _wbfm(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Wideband FM with a random peak deviation."""
    deviation = rng.uniform(*WBFM_DEVIATION, (n, 1))
    return np.exp(2j * np.pi * np.cumsum(deviation * audio_message(n, length, rng), axis=1))


MODULATORS: dict[str, Modulator] = {
    **{name: _linear(points) for name, points in CONSTELLATIONS.items()},
    "CPFSK": _continuous_phase(CPFSK_INDEX, None),
    "GFSK": _continuous_phase(GFSK_INDEX, _GAUSSIAN),
    "AM-DSB": _am_dsb,
    "AM-SSB": _am_ssb,
    "WBFM": _wbfm,
}


# --------------------------------------------------------------------------- channel


def _multipath(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Static few-tap channel per frame: Rician first tap (random K), Rayleigh later taps."""
    n = len(x)
    profile = np.asarray(MULTIPATH_PROFILE) / np.sum(MULTIPATH_PROFILE)
    shape = (n, len(profile))
    scatter = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)
    k = rng.uniform(0, MAX_RICIAN_K, n)
    line_of_sight = np.exp(2j * np.pi * rng.random(n))
    scatter[:, 0] = np.sqrt(k / (k + 1)) * line_of_sight + np.sqrt(1 / (k + 1)) * scatter[:, 0]
    taps = scatter * np.sqrt(profile)
    out = np.zeros_like(x)
    for delay, tap in zip(MULTIPATH_DELAYS, taps.T, strict=True):
        out[:, delay:] += tap[:, None] * x[:, : x.shape[1] - delay]
    return out


def _frequency_phase_offset(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate each frame by a random carrier frequency offset and a random initial phase."""
    n, length = x.shape
    cfo = rng.uniform(-MAX_CFO, MAX_CFO, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    return x * np.exp(1j * (2 * np.pi * cfo * np.arange(length) + phase))


def _resample_window(x: np.ndarray, frame_length: int, rng: np.random.Generator) -> np.ndarray:
    """A ``frame_length`` window at a random fractional start, with a sample-rate offset (linear interp.)."""
    n = len(x)
    rate = 1 + rng.uniform(-MAX_RATE_OFFSET, MAX_RATE_OFFSET, (n, 1))
    start = rng.uniform(MARGIN, MARGIN + WINDOW_SLACK, (n, 1))
    t = start + rate * np.arange(frame_length)
    index = np.floor(t).astype(np.int64)
    frac = t - index
    left = np.take_along_axis(x, index, axis=1)
    right = np.take_along_axis(x, index + 1, axis=1)
    return left + frac * (right - left)


def _awgn(signal: np.ndarray, snr_db: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Complex white Gaussian noise whose power is the frame's signal power / 10^(SNR/10)."""
    power = np.mean(np.abs(signal) ** 2, axis=1, keepdims=True)
    sigma = np.sqrt(power / 10 ** (np.asarray(snr_db, dtype=float)[:, None] / 10) / 2)
    return sigma * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))


def _generation_length(frame_length: int) -> int:
    return int(np.ceil(frame_length * (1 + MAX_RATE_OFFSET))) + 2 * MARGIN + WINDOW_SLACK + 2


# --------------------------------------------------------------------------- synthetic generator


@dataclass(frozen=True)
class SyntheticFrames:
    """Generated frames before normalisation, split into their two parts (complex, shape (n, L))."""

    signal: np.ndarray  # modulated signal after fading, frequency/phase and timing offsets
    noise: np.ndarray  # AWGN at the requested SNR relative to ``signal``'s power

    @property
    def received(self) -> np.ndarray:
        return self.signal + self.noise


def synthesize(
    modulation: str, snr_db: np.ndarray, frame_length: int, rng: np.random.Generator
) -> SyntheticFrames:
    """One frame per entry of ``snr_db`` of ``modulation``, through the full channel.

    Signal chain: random symbols / audio message → modulation (unit power) → multipath fading →
    carrier frequency and phase offset → sample-rate offset and random window → AWGN.
    """
    if modulation not in MODULATORS:
        raise DataError(f"unknown modulation {modulation!r}; known: {', '.join(MODULATIONS)}")
    snr_db = np.asarray(snr_db)
    clean = MODULATORS[modulation](len(snr_db), _generation_length(frame_length), rng)
    clean = clean / _rms(clean)
    channel = _frequency_phase_offset(_multipath(clean, rng), rng)
    signal = _resample_window(channel, frame_length, rng)
    return SyntheticFrames(signal, _awgn(signal, snr_db, rng))


def to_iq(frames: np.ndarray) -> np.ndarray:
    """Complex (n, L) → float32 (n, 2, L) with rows I and Q."""
    return np.stack([frames.real, frames.imag], axis=1).astype(np.float32)


def _synthetic_snrs(spec: DataSpec) -> list[int]:
    snrs = [s for s in SNR_LEVELS if spec.snr_min <= s <= spec.snr_max]
    if not snrs:
        raise DataError(
            f"radio-synthetic: no SNR level of {SNR_LEVELS[0]}..{SNR_LEVELS[-1]} dB (2 dB steps) lies in "
            f"[data.snr_min={spec.snr_min}, data.snr_max={spec.snr_max}]; widen that range"
        )
    return snrs


def synthetic_memory(spec: DataSpec) -> int:
    """Rough peak bytes :func:`generate_synthetic` needs: the working arrays of one modulation plus
    :data:`FRAME_COPIES` copies of all float32 frames."""
    per_class = len(_synthetic_snrs(spec)) * spec.frames_per_class_snr
    working = SYNTHETIC_WORKING_ARRAYS * per_class * 2 * _generation_length(spec.frame_length) * 16
    return working + FRAME_COPIES * len(MODULATIONS) * per_class * 2 * spec.frame_length * 4


def generate_synthetic(spec: DataSpec, seed: int) -> ArrayDataset:
    """All synthetic frames (class-major order): ``spec.frames_per_class_snr`` per (class, SNR)."""
    check_memory(
        synthetic_memory(spec),
        "radio-synthetic",
        f"data.frame_length={spec.frame_length} with data.frames_per_class_snr={spec.frames_per_class_snr}",
        "lower data.frame_length or data.frames_per_class_snr",
    )
    snr = np.repeat(np.asarray(_synthetic_snrs(spec), dtype=np.int16), spec.frames_per_class_snr)
    rng = seeded_rng(seed, "radio-synthetic")
    x = np.concatenate([to_iq(synthesize(m, snr, spec.frame_length, rng).received) for m in MODULATIONS])
    y = np.repeat(np.arange(len(MODULATIONS), dtype=np.int64), len(snr))
    return ArrayDataset(normalise_frames(x), y, np.tile(snr, len(MODULATIONS)))


@DATASETS.register("radio-synthetic")
def build_synthetic(spec: DataSpec, seed: int) -> tuple[ArrayDataset, DatasetMeta]:
    """RadioML 2016.10a-style frames generated in numpy, deterministic from ``seed``."""
    data = generate_synthetic(spec, seed)
    settings = {
        "generator": "radio-synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        **spec.model_dump(include={"frames_per_class_snr", "snr_min", "snr_max", "frame_length"}),
        "val_fraction": spec.val_fraction,
    }
    meta = DatasetMeta(
        name="radio-synthetic",
        task="classification",
        input_shape=tuple(data.x.shape[1:]),
        classes=list(MODULATIONS),
        normalisation=dict(NORMALISATION),
        fingerprint=sha256_json(settings),
        source=f"synthetic RadioML-2016.10a-style, seed {seed}",
    )
    return data, meta


# --------------------------------------------------------------------------- file datasets


def _require_file(spec: DataSpec, what: str) -> Path:
    if spec.path is None:
        raise DataError(f"data.name={spec.name} needs data.path: set it to the {what} (--set data.path=FILE)")
    path = Path(spec.path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "not found"
        raise DataError(f"{path}: {state}; set data.path to the {what}")
    return path


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _file_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per (path, size, modification time) in this process."""
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def select_frames(y: np.ndarray, snr: np.ndarray, spec: DataSpec, seed: int, source: str) -> np.ndarray:
    """Sorted indices of the frames with SNR in [snr_min, snr_max], capped at ``spec.max_frames``.

    The cap is a stratified random subsample: every (class, SNR) pair keeps its share.
    """
    keep = np.flatnonzero((snr >= spec.snr_min) & (snr <= spec.snr_max))
    if keep.size == 0:
        raise DataError(
            f"{source}: no frames with SNR in [data.snr_min={spec.snr_min}, data.snr_max={spec.snr_max}] dB "
            f"(the file has {int(snr.min())}..{int(snr.max())} dB); widen that range"
        )
    if spec.max_frames is not None and spec.max_frames < keep.size:
        picked = stratified_pick(strata(y[keep], snr[keep]), spec.max_frames, seeded_rng(seed, "max-frames"))
        keep = keep[picked]
    return keep


def _file_meta(
    name: str, path: Path, spec: DataSpec, seed: int, classes: list[str], data: ArrayDataset
) -> DatasetMeta:
    settings = {
        "loader": name,
        "file_sha256": _file_sha256(path),
        "seed": seed,
        **spec.model_dump(include={"snr_min", "snr_max", "max_frames", "val_fraction"}),
    }
    return DatasetMeta(
        name=name,
        task="classification",
        input_shape=tuple(data.x.shape[1:]),
        classes=classes,
        normalisation=dict(NORMALISATION),
        fingerprint=sha256_json(settings),
        source=str(path),
    )


# numpy's own unpickling helpers, taken from how numpy pickles (their module moved in numpy 2)
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 arrays
_SCALAR = np.float32(0).__reduce__()[0]


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and plain containers; any other global raises :class:`DataError`.

    Loading a pickle may call any function it names, so only the constructors numpy arrays need are
    allowed (under both their numpy 1 and numpy 2 module names), plus ``_codecs.encode``, which
    Python 3 protocol-2 pickles use to store bytes. Strings are decoded as latin-1, which reads the
    byte strings of Python 2 pickles such as RML2016.10a.
    """

    ALLOWED: dict[tuple[str, str], object] = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy.core.multiarray", "scalar"): _SCALAR,
        ("numpy._core.multiarray", "scalar"): _SCALAR,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        allowed = self.ALLOWED.get((module, name))
        if allowed is None:
            raise DataError(
                f"{self.path}: refusing to unpickle {module}.{name} (only numpy arrays are allowed); "
                "this is not an RML2016.10a file, do not load it"
            )
        return allowed


_CORRUPT_PICKLE = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
)  # fmt: skip


def load_pickle(path: Path) -> object:
    """The object in pickle ``path``, read with :class:`ArrayUnpickler`."""
    try:
        with open(path, "rb") as handle:
            return ArrayUnpickler(handle, path).load()
    except _CORRUPT_PICKLE as exc:
        raise DataError(
            f"{path}: truncated or corrupt pickle ({type(exc).__name__}: {exc}); download the file again"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check its permissions") from None


_RML2016_FORMAT = "expected RML2016.10a's dict of (modulation, snr) -> float32 array (N, 2, L)"


def _rml2016_arrays(table: object, path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(classes, x, y, snr) from the RML2016.10a dict, checking its structure."""
    if not isinstance(table, dict) or not table:
        raise DataError(f"{path}: {_RML2016_FORMAT}, got {type(table).__name__}; point data.path at it")
    for key, value in table.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise DataError(f"{path}: key {key!r} is not a (modulation, snr) pair; {_RML2016_FORMAT}")
        if not (isinstance(key[0], str) and isinstance(key[1], Integral)):
            raise DataError(f"{path}: key {key!r} is not a (modulation, snr) pair; {_RML2016_FORMAT}")
        if not (isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[1] == 2):
            shape = getattr(value, "shape", type(value).__name__)
            raise DataError(f"{path}: entry {key!r} has shape {shape}; {_RML2016_FORMAT}")
        if value.dtype.kind not in "fiu":  # object, complex, string or structured arrays
            raise DataError(f"{path}: entry {key!r} holds {value.dtype} values; {_RML2016_FORMAT}")
        require_finite(value, str(path), f"entry {key!r}")
    lengths = sorted({value.shape[2] for value in table.values()})
    if len(lengths) > 1:
        raise DataError(f"{path}: frames of different lengths {lengths}; {_RML2016_FORMAT}")
    _check_frame_length(lengths[0], path)
    classes = sorted({mod for mod, _ in table})
    keys = sorted(table, key=lambda key: (classes.index(key[0]), int(key[1])))
    x = np.concatenate([np.asarray(table[key], dtype=np.float32) for key in keys])
    y = np.concatenate([np.full(len(table[key]), classes.index(key[0]), dtype=np.int64) for key in keys])
    snr = np.concatenate([np.full(len(table[key]), int(key[1]), dtype=np.int16) for key in keys])
    return classes, x, y, snr


def _check_frame_length(length: int, path: Path) -> None:
    if length < MIN_FRAME_LENGTH:
        raise DataError(
            f"{path}: frames are {length} samples long, shorter than the {MIN_FRAME_LENGTH} the models "
            "accept; use a file of longer frames"
        )


@DATASETS.register("rml2016", aliases=("rml2016.10a",))
def load_rml2016(spec: DataSpec, seed: int) -> tuple[ArrayDataset, DatasetMeta]:
    """RadioML 2016.10a (O'Shea & West, Radio Machine Learning Dataset Generation with GNU Radio, 2016).

    ``RML2016.10a_dict.pkl`` is a Python 2 pickle of ``{(modulation, snr): float32 (N, 2, 128)}``;
    it is read with a restricted unpickler. Classes are the sorted modulation names.
    """
    path = _require_file(spec, "RML2016.10a pickle (RML2016.10a_dict.pkl)")
    check_memory(
        PICKLE_COPIES * path.stat().st_size,
        str(path),
        f"data.path (a {path.stat().st_size / 2**30:.1f} GiB pickle, read whole)",
        "use a smaller file or a machine with more memory",
    )
    classes, x, y, snr = _rml2016_arrays(load_pickle(path), path)
    keep = select_frames(y, snr, spec, seed, str(path))
    data = ArrayDataset(normalise_frames(x[keep]), y[keep], snr[keep])
    return data, _file_meta("rml2016", path, spec, seed, classes, data)


def _rml2018_datasets(handle: h5py.File, path: Path) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]:
    """The X, Y, Z datasets of an RML2018.01a file, with their shapes checked."""
    missing = [name for name in ("X", "Y", "Z") if not isinstance(handle.get(name), h5py.Dataset)]
    if missing:
        raise DataError(
            f"{path}: missing dataset(s) {', '.join(missing)}; expected RML2018.01a's X (N, L, 2), "
            "Y (N, classes) one-hot, Z (N, 1) SNR"
        )
    xs, ys, zs = handle["X"], handle["Y"], handle["Z"]
    for name, dataset in (("X", xs), ("Y", ys), ("Z", zs)):
        if dataset.dtype.kind not in "fiu":
            raise DataError(
                f"{path}: dataset {name} holds {dataset.dtype} values, not numbers; expected RML2018.01a's "
                "float X, one-hot Y and SNR Z"
            )
    n = xs.shape[0] if xs.ndim else 0
    if not (
        xs.ndim == 3
        and xs.shape[2] == 2
        and ys.ndim == 2
        and ys.shape[0] == n
        and zs.shape in {(n,), (n, 1)}
        and n > 0
    ):
        raise DataError(
            f"{path}: shapes X {xs.shape}, Y {ys.shape}, Z {zs.shape} do not match RML2018.01a's "
            "X (N, L, 2), Y (N, classes), Z (N, 1)"
        )
    return xs, ys, zs


def _one_hot_labels(ys: h5py.Dataset, path: Path) -> np.ndarray:
    """Class indices from the one-hot Y, read in blocks."""
    labels = np.empty(ys.shape[0], dtype=np.int64)
    for start in range(0, ys.shape[0], HDF5_BLOCK):
        block = np.asarray(ys[start : start + HDF5_BLOCK], dtype=np.float64)
        if not np.all(np.sum(block, axis=1) == 1) or not np.all(np.max(block, axis=1) == 1):
            rows = f"{start}..{start + len(block) - 1}"
            raise DataError(f"{path}: Y rows {rows} are not one-hot; expected RML2018.01a's one-hot labels")
        labels[start : start + len(block)] = np.argmax(block, axis=1)
    return labels


def _read_frames(xs: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """float32 (len(rows), 2, L) from X (N, L, 2) at the sorted ``rows``, a block at a time.

    A block whose rows are dense is read as one slice; a sparse one by point selection, so a small
    subsample never reads the whole file.
    """
    out = np.empty((len(rows), 2, xs.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), HDF5_BLOCK):
        block = rows[start : start + HDF5_BLOCK]
        first, last = int(block[0]), int(block[-1])
        dense = last - first + 1 <= 2 * len(block)
        frames = xs[first : last + 1][block - first] if dense else xs[block]
        out[start : start + len(block)] = np.asarray(frames, dtype=np.float32).transpose(0, 2, 1)
    return out


@DATASETS.register("rml2018", aliases=("rml2018.01a",))
def load_rml2018(spec: DataSpec, seed: int) -> tuple[ArrayDataset, DatasetMeta]:
    """RadioML 2018.01a (O'Shea, Roy, Clancy, Over-the-Air Deep Learning Based Radio Signal
    Classification, 2018).

    HDF5 with X (N, 1024, 2) float32, Y (N, 24) one-hot, Z (N, 1) SNR. Labels and SNRs are read
    first; then only the selected frames of X, so ``max_frames`` keeps memory small.
    """
    path = _require_file(spec, "RML2018.01a HDF5 file (GOLD_XYZ_OSC.0001_1024.hdf5)")
    try:
        with h5py.File(path, "r") as handle:
            xs, ys, zs = _rml2018_datasets(handle, path)
            _check_frame_length(xs.shape[1], path)
            y = _one_hot_labels(ys, path)
            snr_values = np.asarray(zs[()], dtype=np.float64).reshape(-1)
            require_finite(snr_values, str(path), "dataset Z (SNR)")
            if np.any(np.abs(snr_values) > SNR_LIMIT_DB):
                raise DataError(
                    f"{path}: dataset Z holds SNRs outside -{SNR_LIMIT_DB}..{SNR_LIMIT_DB} dB; "
                    "expected RML2018.01a's SNR in dB"
                )
            snr = np.rint(snr_values).astype(np.int16)
            keep = select_frames(y, snr, spec, seed, str(path))
            check_memory(
                FRAME_COPIES * len(keep) * 2 * xs.shape[1] * 4,
                str(path),
                f"{len(keep)} frames of {xs.shape[1]} samples (data.max_frames={spec.max_frames})",
                "set data.max_frames lower, or narrow data.snr_min..data.snr_max",
            )
            x = _read_frames(xs, keep)
            require_finite(x, str(path), "dataset X")
            n_classes = ys.shape[1]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: truncated or unreadable HDF5 file ({exc}); download it again") from None
    known = n_classes == len(RML2018_CLASSES)
    classes = list(RML2018_CLASSES) if known else [f"class{i}" for i in range(n_classes)]
    data = ArrayDataset(normalise_frames(x), y[keep], snr[keep])
    return data, _file_meta("rml2018", path, spec, seed, classes, data)
