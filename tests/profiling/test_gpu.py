"""NVML sampler with a fake device handle, without any GPU, and the CPU timer."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from userllm.profiling.gpu import GpuSampler, nvml_status
from userllm.profiling.timing import Timer, time_fn


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """pynvml stand-in: 200 W constant power, an energy counter that grows 200 J per second."""

    NVMLError = FakeNVMLError

    def __init__(self, energy_supported: bool = True, power_w: float = 200.0):
        self.energy_supported = energy_supported
        self.power_w = power_w
        self.t0 = time.perf_counter()
        self.inits = self.shutdowns = 0
        self.handles = []

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index != 0:
            raise FakeNVMLError("Invalid Argument")
        self.handles.append(("handle", index))
        return ("handle", index)

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU 80GB"

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=75, memory=20)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 << 30, used=(3 << 30), free=(77 << 30))

    def nvmlDeviceGetPowerUsage(self, h):
        return int(self.power_w * 1000)                      # milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy_supported:
            raise FakeNVMLError("Not Supported")
        return int((time.perf_counter() - self.t0) * self.power_w * 1000)   # millijoules


@pytest.mark.parametrize("energy_supported", [True, False])
def test_sampler_with_fake_handle(energy_supported):
    fake = FakeNvml(energy_supported)
    with GpuSampler(interval_s=0.01, device_index=0, nvml=fake) as s:
        time.sleep(0.2)
    r = s.report()
    assert r.available and r.reason is None
    assert r.device_name == "Fake GPU 80GB" and r.device_index == 0
    assert r.n_samples >= 5 and len(r.samples) == r.n_samples
    assert r.util_mean_pct == 75 and r.util_max_pct == 75
    assert r.mem_used_max_bytes == 3 << 30
    assert r.power_mean_w == pytest.approx(200.0) and r.power_max_w == pytest.approx(200.0)
    assert r.energy_method == ("nvml_total_energy" if energy_supported else "integrated_power")
    # 200 W for ~0.2 s (the block's wall time) = ~40 J, by either method
    assert r.energy_j == pytest.approx(200.0 * r.wall_s, rel=0.1)
    assert r.wall_s >= 0.2 and fake.inits == 1 and fake.shutdowns == 1
    assert "samples" not in r.to_dict() and r.to_dict(with_samples=True)["samples"]
    assert r.energy_str().endswith(" J")


def test_sampler_bad_device_index_is_reported_not_raised():
    with GpuSampler(interval_s=0.01, device_index=3, nvml=FakeNvml()) as s:
        pass
    r = s.report()
    assert not r.available and "no device 3" in r.reason


class NoLibrary:
    """What pynvml does on a machine without libnvidia-ml.so."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError("NVML Shared Library Not Found")


def test_sampler_without_gpu_reports_cpu_time():
    with GpuSampler(interval_s=0.01, nvml=NoLibrary()) as s:
        t = time.process_time()
        while time.process_time() - t < 0.05:      # burn some CPU
            sum(range(1000))
    r = s.report()
    assert not r.available
    assert "no NVIDIA GPU" in r.reason and "Library Not Found" in r.reason
    assert r.cpu_s >= 0.04 and r.wall_s >= r.cpu_s * 0.5
    assert r.energy_j is None and r.util_mean_pct is None and r.n_samples == 0
    assert r.energy_str().startswith("n/a (no NVIDIA GPU")
    assert nvml_status(NoLibrary())[0] is False
    assert nvml_status(FakeNvml()) == (True, None)


def test_sampler_on_this_machine_never_raises():
    """The real pynvml: on a CPU-only machine it must say why, on a GPU machine it must sample."""
    with GpuSampler(interval_s=0.01) as s:
        time.sleep(0.03)
    r = s.report()
    assert r.available == (r.reason is None)
    if r.available:
        assert r.n_samples >= 1 and r.device_name
    else:
        assert r.reason.startswith("no NVIDIA GPU")


def test_report_before_exit_is_an_error():
    s = GpuSampler(nvml=FakeNvml())
    with pytest.raises(RuntimeError):
        s.report()
    with pytest.raises(ValueError):
        GpuSampler(interval_s=0)


def test_cpu_timer_records_time_cpu_and_rss():
    with Timer("cpu") as t:
        x = torch.ones(2_000_000)            # 8 MB: shows up in the RSS peak
        y = (x * 2).sum()
    r = t.result
    assert y.item() == 4_000_000
    assert r.device == "cpu" and r.peak_mem_bytes is None
    assert r.wall_s > 0 and r.device_s == r.wall_s and r.cpu_s >= 0
    assert r.peak_rss_bytes and r.peak_rss_bytes > 8_000_000
    assert r.rss_peak_scope in ("block", "process")
    runs = time_fn(lambda: torch.ones(10).sum(), "cpu", repeats=2, warmup=1)
    assert len(runs) == 2 and all(x.wall_s > 0 for x in runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timer_records_event_time_and_peak_memory():
    with Timer("cuda") as t:
        x = torch.ones(1 << 20, device="cuda")
        (x @ x).item()
    r = t.result
    assert r.device_s > 0 and r.peak_mem_bytes >= 4 << 20
