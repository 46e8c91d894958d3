"""espeak-ng through ctypes: load the library, pick a voice, speak a sentence to 16 kHz samples.

Determinism
    The same arguments give sample-identical audio. espeak-ng keeps DSP state in function-level
    statics (pitch-flutter phase, automatic gain, echo buffer, noise generator) that neither
    ``espeak_Terminate`` nor ``espeak_Initialize`` reset, so an utterance would otherwise depend on
    which utterances the same process voiced before it. :class:`EspeakVoice` therefore unloads and
    reloads its private instance of the shared library between utterances (about 0.5 ms), which
    restores the library's pristine static state.

espeak-ng is not thread safe: use one :class:`EspeakVoice` per process.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import weakref

import numpy as np

SAMPLE_RATE = 16000  # what synthesize() returns, whatever espeak's native rate

# --- espeak-ng C API constants (speak_lib.h) -------------------------------------------------
AUDIO_OUTPUT_RETRIEVAL = 1
AUDIO_OUTPUT_SYNCHRONOUS = 2
espeakINITIALIZE_DONT_EXIT = 0x8000
espeakRATE = 1
espeakPITCH = 3
POS_CHARACTER = 1
espeakCHARS_UTF8 = 1
espeakENDPAUSE = 0x1000
EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakVoiceStruct(ctypes.Structure):  # espeak_VOICE, leading fields only (read-only use)
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
    ]


# --- library location ------------------------------------------------------------------------
def default_paths() -> tuple[str, str]:
    """(shared library, espeak-ng-data directory) of the espeakng-loader package."""
    try:
        import espeakng_loader
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise RuntimeError("the synthetic corpus needs the 'espeakng-loader' package") from exc
    return str(espeakng_loader.get_library_path()), str(espeakng_loader.get_data_path())


def _is_resident(path: str) -> bool:
    """Whether the shared object at `path` is currently mapped into this process."""
    import _ctypes

    try:
        handle = _ctypes.dlopen(path, os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError:
        return False
    _ctypes.dlclose(handle)
    return True


_VERSION_CACHE: dict[str, str] = {}


def espeak_version(library_path: str | None = None) -> str:
    """espeak-ng's version string (loads the library briefly; no initialisation)."""
    lib_path = library_path or default_paths()[0]
    if lib_path not in _VERSION_CACHE:
        import _ctypes

        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as exc:
            raise RuntimeError(f"could not load the espeak-ng library {lib_path}: {exc}") from exc
        try:
            lib.espeak_Info.restype = ctypes.c_char_p
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            _VERSION_CACHE[lib_path] = (lib.espeak_Info(None) or b"unknown").decode()
        finally:
            _ctypes.dlclose(lib._handle)
    return _VERSION_CACHE[lib_path]


# --- the ctypes wrapper ----------------------------------------------------------------------
class EspeakVoice:
    """One espeak-ng instance (ctypes, synchronous, samples collected by callback).

    Create one per process: espeak-ng is not thread safe. ``synthesize`` reloads the library
    before every utterance after the first, so that the output depends only on the arguments
    (see the module docstring). If some other code in this process holds the same library
    mapped, a private copy of the shared object is used instead, so the reload still works.
    """

    def __init__(self, library_path: str | os.PathLike | None = None, data_path: str | os.PathLike | None = None):
        default_lib, default_data = default_paths() if library_path is None or data_path is None else ("", "")
        self.library_path = str(library_path or default_lib)
        self.data_path = str(data_path or default_data)
        self._load_path = self.library_path
        self._private_dir: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._lib: ctypes.CDLL | None = None
        self._dirty = False
        self._closed = False
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._on_samples)  # keep a reference for the C side
        self.native_rate = 0
        self.version = "unknown"
        if _is_resident(self.library_path):
            self._use_private_copy()
        self._load()

    # -- lifecycle
    def _use_private_copy(self) -> None:
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="ds2exp-espeak-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._private_dir, True)
            self._load_path = os.path.join(self._private_dir, os.path.basename(self.library_path))
            shutil.copy2(self.library_path, self._load_path)

    def _load(self) -> None:
        try:
            lib = ctypes.CDLL(self._load_path)
        except OSError as exc:
            raise RuntimeError(f"could not load the espeak-ng library {self.library_path}: {exc}") from exc
        try:
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
            lib.espeak_SetSynthCallback.restype = None
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetVoiceByName.restype = ctypes.c_int
            lib.espeak_GetCurrentVoice.argtypes = []
            lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_EspeakVoiceStruct)
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_SetParameter.restype = ctypes.c_int
            lib.espeak_Synth.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
            ]
            lib.espeak_Synth.restype = ctypes.c_int
            lib.espeak_Synchronize.restype = ctypes.c_int
            lib.espeak_Terminate.restype = ctypes.c_int
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            lib.espeak_Info.restype = ctypes.c_char_p
        except AttributeError as exc:
            self._dlclose(lib)
            raise RuntimeError(f"{self.library_path} does not look like espeak-ng: {exc}") from exc
        rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), espeakINITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            self._dlclose(lib)
            raise RuntimeError(
                f"espeak_Initialize failed (returned {rate}) for the espeak-ng library "
                f"{self.library_path} with data directory {self.data_path}"
            )
        lib.espeak_SetSynthCallback(self._callback)
        if hasattr(lib, "espeak_ng_SetRandSeed"):  # noise generator (breathy voices)
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = None
            lib.espeak_ng_SetRandSeed(0)
        self.native_rate = int(rate)
        self.version = (lib.espeak_Info(None) or b"unknown").decode()
        self._lib = lib
        self._dirty = False

    @staticmethod
    def _dlclose(lib: ctypes.CDLL) -> None:
        import _ctypes

        _ctypes.dlclose(lib._handle)

    def _unload(self) -> None:
        if self._lib is not None:
            self._lib.espeak_Terminate()
            self._dlclose(self._lib)
            self._lib = None

    def reset(self) -> None:
        """Reload the library so that its static synthesis state is pristine again."""
        self._unload()
        if _is_resident(self._load_path):
            # Someone else holds this file mapped: its statics would survive the reload.
            if self._private_dir is not None:
                raise RuntimeError(f"cannot unload the private espeak-ng copy {self._load_path}")
            self._use_private_copy()
        self._load()

    def close(self) -> None:
        self._closed = True
        self._unload()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "EspeakVoice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- synthesis
    def _on_samples(self, wav, numsamples, events) -> int:
        if numsamples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    def set_voice(self, voice: str) -> None:
        lib = self._require()
        rc = lib.espeak_SetVoiceByName(voice.encode())
        if rc != EE_OK:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} (error {rc})")
        if "+" in voice:  # espeak silently ignores an unknown variant: check it was applied
            current = lib.espeak_GetCurrentVoice()
            ident = (current.contents.identifier or b"").decode() if current else ""
            if not ident.lower().endswith("+" + voice.split("+", 1)[1].lower()):
                raise RuntimeError(f"espeak-ng did not apply the variant of {voice!r} (got {ident!r})")

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """Speak `text`; returns float32 mono samples in [-1, 1] at 16 kHz."""
        if self._closed:
            raise RuntimeError("EspeakVoice is closed")
        if self._dirty or self._lib is None:
            self.reset()
        lib = self._require()
        self._dirty = True
        self.set_voice(voice)
        for param, value in ((espeakRATE, rate), (espeakPITCH, pitch)):
            rc = lib.espeak_SetParameter(param, int(value), 0)
            if rc != EE_OK:
                raise RuntimeError(f"espeak_SetParameter({param}, {value}) failed with error {rc}")
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        rc = lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, espeakCHARS_UTF8 | espeakENDPAUSE, None, None)
        if rc != EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error {rc} for {text!r}")
        lib.espeak_Synchronize()
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        self._chunks = []
        audio = pcm.astype(np.float32) / 32768.0
        if self.native_rate != SAMPLE_RATE and audio.size:
            import soxr

            audio = soxr.resample(audio, self.native_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
        return audio

    def _require(self) -> ctypes.CDLL:
        if self._lib is None:
            raise RuntimeError("EspeakVoice is closed")
        return self._lib

