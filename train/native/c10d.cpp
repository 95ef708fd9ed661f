// A thin binding to PyTorch's distributed engine (c10d) as libtorch ships it: a TCPStore
// rendezvous, a Gloo (CPU) or NCCL (CUDA) process group, bucketed all-reduce, broadcast from a
// root, barrier. Just what data-parallel training needs; the Rust side is `train/distributed.rs`.
//
// Build (see build.rs): ProcessGroupGloo.hpp includes gloo's headers, which torch wheels do not
// ship. The Gloo backend itself is compiled into libtorch_cpu; its header needs gloo's headers
// only to *parse* (ProcessGroupGloo holds every gloo type behind a shared_ptr, and this file never
// constructs a gloo object or calls a gloo function), so the distribution's libgloo-dev headers
// serve, whatever gloo commit torch pinned. build.rs defines USE_C10D_GLOO when it finds them
// (`make setup` unpacks them into .gloo-headers) and USE_C10D_NCCL when torch has CUDA and the
// venv has nccl.h and the CUDA runtime headers; without them the backend is refused at run time
// with a clear error.
//
// Every function returns 0 on success, or 1 with a message in `err` (C++ exceptions must not
// cross into Rust). Tensors come in as the `at::Tensor*` that a tch Tensor wraps.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <ATen/ATen.h>

#include "guarded.h"

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using clover_native::guarded;

}  // namespace

struct clover_pg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

namespace {

c10::intrusive_ptr<c10d::Backend> gloo_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                               int rank, int world,
                                               std::chrono::milliseconds timeout) {
#ifdef USE_C10D_GLOO
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  // As torch.distributed does: the interface GLOO_SOCKET_IFNAME names, else this host's address.
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  options->devices.push_back(ifname != nullptr && *ifname != '\0'
                                 ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                                 : c10d::ProcessGroupGloo::createDefaultDevice());
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
#else
  throw std::runtime_error(
      "clover was built without the Gloo backend (gloo's headers were not found at build time: "
      "run `make setup` (or set GLOO_INCLUDE) and rebuild)");
#endif
}

c10::intrusive_ptr<c10d::Backend> nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                               int rank, int world,
                                               std::chrono::milliseconds timeout) {
#ifdef USE_C10D_NCCL
  if (!at::hasCUDA()) {
    throw std::runtime_error("the NCCL backend needs CUDA, and no CUDA device is available");
  }
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
#else
  throw std::runtime_error(
      "clover was built without the NCCL backend (torch without CUDA, or nccl.h and the CUDA "
      "runtime headers missing from the venv at build time)");
#endif
}

// Tensors grouped into buckets of at most `bucket_bytes` (a tensor larger than that gets its own),
// cut also where the dtype or device changes, since a bucket is one flat tensor.
std::vector<std::vector<at::Tensor>> buckets_of(at::Tensor** tensors, size_t n,
                                                int64_t bucket_bytes) {
  std::vector<std::vector<at::Tensor>> buckets;
  int64_t bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = *tensors[i];
    int64_t size = static_cast<int64_t>(t.nbytes());
    bool fits = !buckets.empty() && bytes + size <= bucket_bytes &&
                buckets.back().front().scalar_type() == t.scalar_type() &&
                buckets.back().front().device() == t.device();
    if (!fits) {
      buckets.emplace_back();
      bytes = 0;
    }
    buckets.back().push_back(t);
    bytes += size;
  }
  return buckets;
}

at::Tensor flatten(const std::vector<at::Tensor>& bucket) {
  std::vector<at::Tensor> flat;
  flat.reserve(bucket.size());
  for (const auto& t : bucket) flat.push_back(t.reshape({-1}));
  return at::cat(flat);
}

void unflatten(const at::Tensor& flat, std::vector<at::Tensor>& bucket) {
  at::NoGradGuard no_grad;
  int64_t offset = 0;
  for (auto& t : bucket) {
    int64_t numel = t.numel();
    t.copy_(flat.narrow(0, offset, numel).view(t.sizes()));
    offset += numel;
  }
}

std::string where(const clover_pg* pg, const char* what) {
  return "rank " + std::to_string(pg->backend->getRank()) + " of " +
         std::to_string(pg->backend->getSize()) + ": " + what + " failed (" +
         pg->backend->getBackendName() + ", timeout " + std::to_string(pg->timeout.count()) +
         " ms; did another rank die?): ";
}

// Runs one collective per bucket: all are launched first (Gloo and NCCL run them in the
// background, in order), then each is waited for and copied back.
template <typename Launch>
void per_bucket(clover_pg* pg, at::Tensor** tensors, size_t n, int64_t bucket_bytes,
                const char* what, Launch&& launch) {
  // Parameters are broadcast too: their flat copies need no autograd history.
  at::NoGradGuard no_grad;
  auto buckets = buckets_of(tensors, n, bucket_bytes);
  std::vector<at::Tensor> flats;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (auto& bucket : buckets) {
    std::vector<at::Tensor> one{flatten(bucket)};
    works.push_back(launch(one));
    flats.push_back(one[0]);
  }
  for (size_t b = 0; b < buckets.size(); ++b) {
    try {
      works[b]->wait(pg->timeout);
    } catch (const c10::Error& e) {
      throw std::runtime_error(where(pg, what) + e.msg());
    } catch (const std::exception& e) {
      throw std::runtime_error(where(pg, what) + e.what());
    }
    unflatten(flats[b], buckets[b]);
  }
}

}  // namespace

extern "C" {

// Joins the group: rendezvous through the TCPStore on host:port (served by rank 0, or, under
// torchrun, by its agent: `serve` = 0, keys under `prefix`), then the backend ("gloo" or
// "nccl"). `timeout_ms` bounds the rendezvous and every collective.
int clover_pg_new(const char* backend, const char* host, int port, int serve, const char* prefix,
                  int rank, int world, int64_t timeout_ms, clover_pg** out, char* err,
                  size_t err_len) {
  return guarded(
      [&] {
        auto timeout = std::chrono::milliseconds(timeout_ms);
        c10d::TCPStoreOptions store_options;
        store_options.port = static_cast<std::uint16_t>(port);
        store_options.isServer = serve != 0;
        // Every rank counts itself in, whoever serves: the server waits for all of them.
        store_options.numWorkers = static_cast<size_t>(world);
        store_options.timeout = timeout;
        c10::intrusive_ptr<c10d::Store> store =
            c10::make_intrusive<c10d::TCPStore>(host, store_options);
        if (prefix != nullptr && *prefix != '\0') {
          store = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
        }
        std::string name(backend);
        c10::intrusive_ptr<c10d::Backend> group;
        if (name == "gloo") {
          group = gloo_backend(store, rank, world, timeout);
        } else if (name == "nccl") {
          group = nccl_backend(store, rank, world, timeout);
        } else {
          throw std::runtime_error("unknown backend '" + name + "' (gloo or nccl)");
        }
        *out = new clover_pg{store, group, timeout};
      },
      err, err_len);
}

void clover_pg_free(clover_pg* pg) { delete pg; }

// Sums the tensors over all ranks in place (then divides by the world size when `average`), one
// reduction per bucket of at most `bucket_bytes`.
int clover_pg_allreduce(clover_pg* pg, at::Tensor** tensors, size_t n, int average,
                        int64_t bucket_bytes, char* err, size_t err_len) {
  return guarded(
      [&] {
        int world = pg->backend->getSize();
        per_bucket(pg, tensors, n, bucket_bytes, "all-reduce", [&](std::vector<at::Tensor>& one) {
          c10d::AllreduceOptions options;
          // Gloo has no AVG: sum, then divide below.
          options.reduceOp = c10d::ReduceOp::SUM;
          options.timeout = pg->timeout;
          return pg->backend->allreduce(one, options);
        });
        if (average) {
          at::NoGradGuard no_grad;
          for (size_t i = 0; i < n; ++i) tensors[i]->div_(world);
        }
      },
      err, err_len);
}

// Overwrites the tensors with rank `root`'s, one broadcast per bucket.
int clover_pg_broadcast(clover_pg* pg, at::Tensor** tensors, size_t n, int root,
                        int64_t bucket_bytes, char* err, size_t err_len) {
  return guarded(
      [&] {
        per_bucket(pg, tensors, n, bucket_bytes, "broadcast", [&](std::vector<at::Tensor>& one) {
          c10d::BroadcastOptions options;
          options.rootRank = root;
          options.timeout = pg->timeout;
          return pg->backend->broadcast(one, options);
        });
      },
      err, err_len);
}

// Returns once every rank has called it (or fails after the timeout).
int clover_pg_barrier(clover_pg* pg, char* err, size_t err_len) {
  return guarded(
      [&] {
        c10d::BarrierOptions options;
        options.timeout = pg->timeout;
        try {
          pg->backend->barrier(options)->wait(pg->timeout);
        } catch (const c10::Error& e) {
          throw std::runtime_error(where(pg, "barrier") + e.msg());
        }
      },
      err, err_len);
}

}  // extern "C"
