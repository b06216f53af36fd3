// Thin pybind11 bindings over the C API. Arrays travel as raw addresses (numpy's
// `ctypes.data`, torch's `data_ptr()`), so numpy arrays, torch tensors and mmapped files all reach
// the kernels without a copy; shapes and dtypes are checked in python/saehook before the call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

#include "saehook.h"

namespace py = pybind11;

namespace {

template <class T>
T *ptr(uintptr_t a) {
  return reinterpret_cast<T *>(a);
}

// Maps a failed status to the Python exception a user expects.
void check(saehook_status st) {
  if (st == SAEHOOK_OK) return;
  std::string msg = saehook_last_error();
  switch (st) {
    case SAEHOOK_ERR_INDEX: throw py::index_error(msg);
    case SAEHOOK_ERR_DTYPE: throw py::type_error(msg);
    case SAEHOOK_ERR_ALLOC: throw std::bad_alloc();
    case SAEHOOK_ERR_OVERFLOW:
      PyErr_SetString(PyExc_OverflowError, msg.c_str());
      throw py::error_already_set();
    case SAEHOOK_ERR_UNSUPPORTED:
    case SAEHOOK_ERR_INTERNAL: throw std::runtime_error(msg);
    default: throw py::value_error(msg);
  }
}

// Runs a C call without the GIL. Not py::gil_scoped_release: its destructor retakes the GIL, and
// a thread that retakes it while the interpreter exits (a daemon thread inside a kernel when
// the main thread calls sys.exit) is ended by Python with pthread_exit, whose unwinding through
// a destructor (noexcept) aborts the process ("terminate called without an active exception").
// Retaken here in ordinary code, the unwinding passes through.
template <class F>
auto without_gil(F &&f) -> decltype(f()) {
  PyThreadState *ts = PyEval_SaveThread();
  auto r = f();
  PyEval_RestoreThread(ts);
  return r;
}

saehook_exec exec_of(int threads, uintptr_t stream) {
  saehook_exec e{};
  e.n_threads = threads;
  e.cuda_stream = reinterpret_cast<void *>(stream);
  return e;
}

struct Handle {
  saehook_sae *h = nullptr;
  ~Handle() { saehook_sae_destroy(h); }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(h); }
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "saehook compiled core (see csrc/include/saehook.h)";
  m.attr("API_VERSION") = saehook_api_version();

  py::class_<Handle, std::shared_ptr<Handle>>(m, "Handle")
      .def_property_readonly("address", &Handle::address,
                             "The saehook_sae* as an integer (for the C API / torch ops).");

  m.def(
      "create",
      [](int64_t d_model, int64_t d_sae, int k, int activation, bool subtract_b_dec,
         uintptr_t W_enc, int enc_dtype, uintptr_t enc_scales, uintptr_t b_enc, uintptr_t W_dec,
         int dec_dtype, int dec_layout, uintptr_t b_dec, uintptr_t threshold, bool copy, bool cuda, int cuda_device) {
        saehook_sae_desc d{};
        d.d_model = d_model;
        d.d_sae = d_sae;
        d.k = k;
        d.activation = saehook_activation(activation);
        d.subtract_b_dec = subtract_b_dec;
        d.W_enc = ptr<const void>(W_enc);
        d.enc_dtype = saehook_dtype(enc_dtype);
        d.enc_scales = ptr<const float>(enc_scales);
        d.b_enc = ptr<const float>(b_enc);
        d.W_dec = ptr<const void>(W_dec);
        d.dec_dtype = saehook_dtype(dec_dtype);
        d.dec_layout = saehook_dec_layout(dec_layout);
        d.b_dec = ptr<const float>(b_dec);
        d.threshold = ptr<const float>(threshold);
        d.copy_weights = copy;
        d.cuda = cuda;
        d.cuda_device = cuda_device;
        auto h = std::make_shared<Handle>();
        check(saehook_sae_create(&d, &h->h));
        return h;
      },
      py::arg("d_model"), py::arg("d_sae"), py::arg("k"), py::arg("activation"),
      py::arg("subtract_b_dec"), py::arg("W_enc"), py::arg("enc_dtype"), py::arg("enc_scales"),
      py::arg("b_enc"), py::arg("W_dec"), py::arg("dec_dtype"), py::arg("dec_layout"),
      py::arg("b_dec"), py::arg("threshold"), py::arg("copy") = false, py::arg("cuda") = false,
      py::arg("cuda_device") = 0);

  m.def("set_prefilter", [](const Handle &s, int dtype, int threads) {
    saehook_exec e = exec_of(threads, 0);
    check(without_gil([&] { return saehook_sae_set_prefilter(s.h, saehook_dtype(dtype), &e); }));
  });
  m.def("prefilter_stats", [](const Handle &s) {
    int64_t o[4];
    check(saehook_sae_prefilter_stats(s.h, o));
    return py::make_tuple(o[0], o[1], o[2], o[3]);
  });

  m.def("encode", [](const Handle &s, uintptr_t x, int64_t n, int64_t ldx, int k, uintptr_t vals,
                     uintptr_t idx, int threads, uintptr_t stream) {
    saehook_exec e = exec_of(threads, stream);
    check(without_gil([&] { return saehook_encode(s.h, ptr<const float>(x), n, ldx, k, ptr<float>(vals), ptr<int32_t>(idx), &e); }));
  });

  m.def("preacts", [](const Handle &s, uintptr_t x, int64_t n, int64_t ldx, uintptr_t out,
                      int threads, uintptr_t stream) {
    saehook_exec e = exec_of(threads, stream);
    check(without_gil([&] { return saehook_preacts(s.h, ptr<const float>(x), n, ldx, ptr<float>(out), &e); }));
  });

  m.def("decode", [](const Handle &s, uintptr_t vals, uintptr_t idx, int64_t n, int k,
                     uintptr_t out, int64_t ldo, int threads, uintptr_t stream) {
    saehook_exec e = exec_of(threads, stream);
    check(without_gil([&] { return saehook_decode(s.h, ptr<const float>(vals), ptr<const int32_t>(idx), n, k,
                          ptr<float>(out), ldo, &e); }));
  });

  m.def("reconstruct", [](const Handle &s, uintptr_t h, int64_t n, int64_t ldh, int threads, uintptr_t stream) {
    saehook_exec e = exec_of(threads, stream);
    check(without_gil([&] { return saehook_reconstruct(s.h, ptr<float>(h), n, ldh, &e); }));
  });

  // items: address of an array of saehook_steer_item (built with numpy's structured dtype).
  m.def("steer", [](const Handle &s, uintptr_t h, int64_t n, int64_t ldh, uintptr_t items,
                    int n_items, uintptr_t mask, int k, uintptr_t vals, uintptr_t idx,
                    int threads, uintptr_t stream) {
    saehook_exec e = exec_of(threads, stream);
    check(without_gil([&] { return saehook_steer(s.h, ptr<float>(h), n, ldh, ptr<const saehook_steer_item>(items), n_items,
                         ptr<const uint8_t>(mask), k, ptr<float>(vals), ptr<int32_t>(idx), &e); }));
  });
  m.attr("STEER_ITEM_SIZE") = sizeof(saehook_steer_item);
  // saehook_steer_ex: latch (n_slots * n_items bytes), slots (int32 per row) and fired
  // (n * n_items bytes) are host addresses or 0.
  m.def("steer_ex", [](const Handle &s, uintptr_t h, int64_t n, int64_t ldh, uintptr_t items,
                       int n_items, uintptr_t mask, int k, uintptr_t vals, uintptr_t idx,
                       uintptr_t latch, uintptr_t slots, int n_slots, uintptr_t fired, int threads,
                       uintptr_t stream) {
    saehook_exec e = exec_of(threads, stream);
    saehook_steer_state state{ptr<uint8_t>(latch), ptr<const int32_t>(slots), n_slots, ptr<uint8_t>(fired)};
    check(without_gil([&] { return saehook_steer_ex(s.h, ptr<float>(h), n, ldh, ptr<const saehook_steer_item>(items),
                                                    n_items, ptr<const uint8_t>(mask), k, ptr<float>(vals),
                                                    ptr<int32_t>(idx), &state, &e); }));
  });

  m.def("decoder_direction", [](const Handle &s, int f, bool normalize, uintptr_t out) {
    check(saehook_decoder_direction(s.h, f, normalize, ptr<float>(out)));
  });

  m.def("quantize_int8", [](uintptr_t src, int dtype, int64_t rows, int64_t cols, uintptr_t q,
                            uintptr_t scales, int threads) {
    saehook_exec e = exec_of(threads, 0);
    check(without_gil([&] { return saehook_quantize_int8(ptr<const void>(src), saehook_dtype(dtype), rows, cols,
                                 ptr<int8_t>(q), ptr<float>(scales), &e); }));
  });

  m.def("convert", [](uintptr_t src, int sdt, uintptr_t dst, int ddt, int64_t n, int threads) {
    saehook_exec e = exec_of(threads, 0);
    check(without_gil([&] { return saehook_convert(ptr<const void>(src), saehook_dtype(sdt), ptr<void>(dst),
                           saehook_dtype(ddt), n, &e); }));
  });

  m.def("cuda_available", [] { return saehook_cuda_available() != 0; });
  m.def("read_probe", [](uintptr_t p, size_t bytes, int threads) {
    saehook_exec e{};
    e.n_threads = threads;
    return without_gil([&] { return saehook_read_probe(reinterpret_cast<const void *>(p), bytes, &e); });
  }, py::arg("ptr"), py::arg("bytes"), py::arg("threads") = 0);
  m.def("set_num_threads", &saehook_set_num_threads);
  m.def("get_num_threads", &saehook_get_num_threads);
  m.def("set_isa", [](const std::string &name) { check(saehook_set_isa(name.c_str())); });
  m.def("get_isa", [] { return std::string(saehook_get_isa()); });
  m.def("available_isas", [] { return std::string(saehook_available_isas()); });
  m.def("cpu_info", [] { return std::string(saehook_cpu_info()); });
  m.def("set_cpu_class", [](const std::string &spec) { check(saehook_set_cpu_class(spec.c_str())); });
}
