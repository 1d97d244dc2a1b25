"""Background NVML sampler: GPU utilisation, memory, power and energy while a block of code runs.

    with GpuSampler(interval_s=0.05) as sampler:
        train_step()
    report = sampler.report()          # GpuReport; report.available is False without an NVIDIA GPU

A daemon thread polls NVML (``nvidia-ml-py``, imported as ``pynvml``) every ``interval_s`` seconds.
Energy comes from ``nvmlDeviceGetTotalEnergyConsumption`` (a hardware counter in millijoules, Volta and
later) read at entry and exit; where the device does not support it, the sampled power is integrated
over time with the trapezoid rule instead, and ``energy_method`` says which one was used.

On a machine without an NVIDIA GPU or without ``libnvidia-ml`` the sampler does not fail: the report
has ``available=False`` and a ``reason``, and still carries the wall-clock and process CPU time.

Tests inject a fake NVML through the ``nvml`` argument: any object with the few ``pynvml`` functions
used here (``nvmlInit``, ``nvmlShutdown``, ``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetName``,
``nvmlDeviceGetUtilizationRates``, ``nvmlDeviceGetMemoryInfo``, ``nvmlDeviceGetPowerUsage``,
``nvmlDeviceGetTotalEnergyConsumption``) and an ``NVMLError`` exception class.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GpuSample:
    """One NVML reading. ``t`` is seconds since the sampler started."""

    t: float
    util_pct: float | None
    mem_used_bytes: int | None
    power_w: float | None


@dataclass
class GpuReport:
    """Summary of one sampled block. GPU fields are None when ``available`` is False or unsupported."""

    available: bool
    reason: str | None
    wall_s: float
    cpu_s: float                              # process CPU time (user + system, all threads)
    device_index: int | None = None
    device_name: str | None = None
    interval_s: float = 0.0
    n_samples: int = 0
    util_mean_pct: float | None = None
    util_max_pct: float | None = None
    mem_used_max_bytes: int | None = None
    power_mean_w: float | None = None
    power_max_w: float | None = None
    energy_j: float | None = None
    energy_method: str | None = None          # "nvml_total_energy" | "integrated_power" | None
    samples: list[GpuSample] = field(default_factory=list)

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_samples:
            out.pop("samples")
        return out

    def energy_str(self) -> str:
        """Human-readable energy, e.g. ``"12.3 J"`` or ``"n/a (no NVIDIA GPU: ...)"``."""
        if self.energy_j is not None:
            return f"{self.energy_j:.3g} J"
        if not self.available:
            return f"n/a ({self.reason})"
        return "n/a (energy not supported by this GPU)"


def _load_pynvml():
    try:
        import pynvml  # nvidia-ml-py
    except ImportError as exc:  # the package is a declared dependency, but keep the sampler usable
        raise RuntimeError(f"nvidia-ml-py is not installed ({exc})") from None
    return pynvml


def _default_device_index() -> int:
    """The NVML index of the GPU torch uses: CUDA_VISIBLE_DEVICES renumbers devices, NVML does not."""
    current = 0
    try:
        import torch

        if torch.cuda.is_available():
            current = torch.cuda.current_device()
    except Exception:  # torch absent or CUDA init failure: fall back to the first device
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if current < len(entries) and entries[current].isdigit():
            return int(entries[current])
    return current


class GpuSampler:
    """Context manager sampling one GPU through NVML on a background thread.

    nvml:         a pynvml-like object (tests pass a fake); default: the real ``pynvml`` module.
    device_index: NVML device index; default: the device torch currently uses (honouring CUDA_VISIBLE_DEVICES).
    interval_s:   sampling period in seconds (NVML power readings update every ~20-100 ms on most GPUs).
    """

    def __init__(self, interval_s: float = 0.05, device_index: int | None = None, nvml: Any = None,
                 keep_samples: bool = True) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.device_index = device_index
        self.keep_samples = keep_samples
        self._nvml = nvml
        self._handle = None
        self._reason: str | None = None
        self._samples: list[GpuSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start_mj: int | None = None
        self._energy_end_mj: int | None = None
        self._energy_supported = False
        self._device_name: str | None = None
        self._report: GpuReport | None = None
        self._t0 = 0.0
        self._cpu0 = 0.0

    # -- NVML plumbing -------------------------------------------------------------------------
    def _open(self) -> bool:
        """Initialise NVML and find the device; on any failure record why and return False."""
        try:
            nvml = self._nvml if self._nvml is not None else _load_pynvml()
            self._nvml = nvml
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError (LibraryNotFound, DriverNotLoaded...) or missing package
            self._reason = f"no NVIDIA GPU: NVML unavailable ({exc})"
            return False
        try:
            index = self.device_index if self.device_index is not None else _default_device_index()
            self.device_index = index
            self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(self._handle)
            self._device_name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as exc:
            self._reason = f"no NVIDIA GPU: NVML found no device {self.device_index} ({exc})"
            self._shutdown()
            return False
        try:
            self._energy_start_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            self._energy_supported = True
        except Exception:  # NVML_ERROR_NOT_SUPPORTED on pre-Volta parts: integrate power instead
            self._energy_supported = False
        return True

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    def _read(self) -> GpuSample:
        nvml, h = self._nvml, self._handle
        util = mem = power = None
        try:
            util = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:
            pass
        try:
            mem = int(nvml.nvmlDeviceGetMemoryInfo(h).used)
        except Exception:
            pass
        try:
            power = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0   # milliwatts -> watts
        except Exception:
            pass
        return GpuSample(time.perf_counter() - self._t0, util, mem, power)

    def _loop(self) -> None:
        while True:
            self._samples.append(self._read())
            if self._stop.wait(self.interval_s):
                break

    # -- context manager -----------------------------------------------------------------------
    def __enter__(self) -> "GpuSampler":
        self._report = None
        self._samples = []
        self._stop.clear()
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        if self._open():
            self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._samples.append(self._read())     # a last reading at the very end of the block
            if self._energy_supported:
                try:
                    self._energy_end_mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
                except Exception:
                    self._energy_supported = False
            self._shutdown()
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._cpu0
        self._report = self._summarise(wall, cpu)

    def report(self) -> GpuReport:
        if self._report is None:
            raise RuntimeError("GpuSampler.report() is available after the `with` block ends")
        return self._report

    def _summarise(self, wall: float, cpu: float) -> GpuReport:
        if self._handle is None:
            return GpuReport(available=False, reason=self._reason, wall_s=wall, cpu_s=cpu,
                             interval_s=self.interval_s)
        s = self._samples
        utils = [x.util_pct for x in s if x.util_pct is not None]
        mems = [x.mem_used_bytes for x in s if x.mem_used_bytes is not None]
        powers = [(x.t, x.power_w) for x in s if x.power_w is not None]
        energy = method = None
        if self._energy_supported and self._energy_end_mj is not None and self._energy_start_mj is not None:
            energy, method = (self._energy_end_mj - self._energy_start_mj) / 1000.0, "nvml_total_energy"
        elif len(powers) >= 2:
            # trapezoid over the samples; the first sample is taken at t ~ 0 and the last at exit
            energy = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(powers, powers[1:]))
            method = "integrated_power"
        return GpuReport(
            available=True, reason=None, wall_s=wall, cpu_s=cpu, device_index=self.device_index,
            device_name=self._device_name, interval_s=self.interval_s, n_samples=len(s),
            util_mean_pct=sum(utils) / len(utils) if utils else None,
            util_max_pct=max(utils) if utils else None,
            mem_used_max_bytes=max(mems) if mems else None,
            power_mean_w=sum(p for _, p in powers) / len(powers) if powers else None,
            power_max_w=max(p for _, p in powers) if powers else None,
            energy_j=energy, energy_method=method,
            samples=list(s) if self.keep_samples else [],
        )


def nvml_status(nvml: Any = None) -> tuple[bool, str | None]:
    """``(True, None)`` when NVML sees at least one GPU, else ``(False, reason)``."""
    try:
        nvml = nvml if nvml is not None else _load_pynvml()
        nvml.nvmlInit()
    except Exception as exc:
        return False, f"no NVIDIA GPU: NVML unavailable ({exc})"
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:
        count, why = 0, str(exc)
    else:
        why = "NVML reports 0 devices"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return (True, None) if count > 0 else (False, f"no NVIDIA GPU: {why}")
