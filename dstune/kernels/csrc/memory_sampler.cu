// Device-level memory sampler. A background thread polls cudaMemGetInfo every `interval_us` and keeps
// the peak of (total - free). Unlike the caching allocator's counters this sees everything on the
// device: the CUDA context, NCCL buffers, cuBLAS workspaces, DeepSpeed's buffers, other processes.
// Only pybind11 and the CUDA runtime: no torch headers, so it builds in seconds.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

namespace py = pybind11;

namespace {

class MemorySampler {
 public:
  MemorySampler(int device, int64_t interval_us) : device_(device), interval_us_(interval_us) {
    if (interval_us <= 0) throw std::invalid_argument("interval_us must be positive");
  }
  ~MemorySampler() { stop(); }

  void start() {
    if (running_.exchange(true)) return;
    sample();  // one reading before start() returns, so peak() is never empty
    thread_ = std::thread([this] { loop(); });
  }

  void stop() {
    if (!running_.exchange(false)) return;
    if (thread_.joinable()) thread_.join();
  }

  void reset_peak() { peak_.store(last_.load()); }
  int64_t peak() const { return peak_.load(); }
  int64_t last() const { return last_.load(); }
  int64_t total() const { return total_.load(); }
  int64_t samples() const { return samples_.load(); }
  std::string error() const {
    std::lock_guard<std::mutex> lock(error_mutex_);
    return error_;
  }

 private:
  void loop() {
    cudaSetDevice(device_);  // the current device is per thread
    while (running_.load()) {
      if (!sample()) break;
      std::this_thread::sleep_for(std::chrono::microseconds(interval_us_));
    }
  }

  bool sample() {
    size_t free_bytes = 0, total_bytes = 0;
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    cudaError_t err = cudaMemGetInfo(&free_bytes, &total_bytes);
    cudaSetDevice(previous);
    if (err != cudaSuccess) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      error_ = cudaGetErrorString(err);
      running_.store(false);
      return false;
    }
    const int64_t used = static_cast<int64_t>(total_bytes - free_bytes);
    last_.store(used);
    total_.store(static_cast<int64_t>(total_bytes));
    int64_t seen = peak_.load();
    while (used > seen && !peak_.compare_exchange_weak(seen, used)) {
    }
    samples_.fetch_add(1);
    return true;
  }

  const int device_;
  const int64_t interval_us_;
  std::atomic<bool> running_{false};
  std::atomic<int64_t> peak_{0}, last_{0}, total_{0}, samples_{0};
  std::thread thread_;
  mutable std::mutex error_mutex_;
  std::string error_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Background sampler of device-level CUDA memory use (cudaMemGetInfo).";
  py::class_<MemorySampler>(m, "MemorySampler")
      .def(py::init<int, int64_t>(), py::arg("device"), py::arg("interval_us") = 100)
      .def("start", &MemorySampler::start)
      .def("stop", &MemorySampler::stop, py::call_guard<py::gil_scoped_release>())
      .def("reset_peak", &MemorySampler::reset_peak)
      .def("peak", &MemorySampler::peak, "highest (total - free) bytes seen since start or reset_peak")
      .def("last", &MemorySampler::last)
      .def("total", &MemorySampler::total)
      .def("samples", &MemorySampler::samples)
      .def("error", &MemorySampler::error);
}
