// The optimizers' per-step confirmation, compiled: mechgpu/optim/_host.py builds and loads it,
// and mechgpu/optim/_fused.py's _GroupCache calls it. It confirms, for every tensor whose address a
// launch will dereference, what _fused._where confirms in Python (address, element count, dtype,
// device, sizes and strides, and a storage that holds them), reading the live tensors without
// running any Python. It holds no reference between calls and writes only the caller's buffers.
//
// A "where" record is one int64 row of WHERE_WIDTH: data_ptr, numel, scalar type, device type,
// device index, ndim, then MAX_DIMS sizes and MAX_DIMS strides. A tensor of more dims, without
// storage, not strided, or a Python subclass has no record: the Python path takes the group.
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int MAX_DIMS = 8;
constexpr int WHERE_WIDTH = 6 + 2 * MAX_DIMS;

// The tensor of a plain torch.Tensor or nn.Parameter (the exact types in `allowed`), else null.
const at::Tensor* plain(PyObject* obj, PyObject* allowed) {
  if (!THPVariable_Check(obj)) return nullptr;
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
  Py_ssize_t n = PyTuple_GET_SIZE(allowed);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyTuple_GET_ITEM(allowed, i) == type) return &THPVariable_Unpack(obj);
  }
  return nullptr;
}

// The bytes from the storage's start that t's elements reach; -1 where a stride is negative.
int64_t reach(const at::Tensor& t) {
  int64_t extent = 1;
  auto sizes = t.sizes();
  auto strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) return 0;
    if (strides[d] < 0) return -1;
    extent += (sizes[d] - 1) * strides[d];
  }
  return (t.storage_offset() + extent) * static_cast<int64_t>(t.itemsize());
}

// Whether t is dense, strided, stored and no Python subclass's: what a record can describe.
bool recordable(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && t.has_storage() && t.dim() <= MAX_DIMS &&
         !t.unsafeGetTensorImpl()->is_python_dispatch();
}

// Whether t's storage holds every element it reaches.
bool stored(const at::Tensor& t) {
  int64_t needed = reach(t);
  return needed >= 0 && needed <= static_cast<int64_t>(t.storage().nbytes());
}

void write_where(const at::Tensor& t, int64_t* w) {
  w[0] = reinterpret_cast<int64_t>(t.data_ptr());
  w[1] = t.numel();
  w[2] = static_cast<int64_t>(t.scalar_type());
  w[3] = static_cast<int64_t>(t.device().type());
  w[4] = t.device().index();
  w[5] = t.dim();
  for (int64_t d = 0; d < MAX_DIMS; ++d) {
    w[6 + d] = d < t.dim() ? t.size(d) : 0;
    w[6 + MAX_DIMS + d] = d < t.dim() ? t.stride(d) : 0;
  }
}

// Whether t matches record w in everything but its address (a grad beside its param's record).
bool fits(const at::Tensor& t, const int64_t* w) {
  if (!recordable(t) || t.numel() != w[1] || static_cast<int64_t>(t.scalar_type()) != w[2] ||
      static_cast<int64_t>(t.device().type()) != w[3] || t.device().index() != w[4] || t.dim() != w[5]) {
    return false;
  }
  for (int64_t d = 0; d < w[5]; ++d) {
    if (t.size(d) != w[6 + d] || t.stride(d) != w[6 + MAX_DIMS + d]) return false;
  }
  return stored(t);
}

bool matches(const at::Tensor& t, const int64_t* w) {
  return fits(t, w) && reinterpret_cast<int64_t>(t.data_ptr()) == w[0];
}

int64_t* rows_of(PyObject* obj) {  // an int64 CPU tensor's data
  return THPVariable_Unpack(obj).data_ptr<int64_t>();
}

int64_t entry_start_count(PyObject* obj) { return THPVariable_Unpack(obj).numel(); }

// where(tensors, allowed) -> int64 tensor [n, WHERE_WIDTH], or None if one has no record.
PyObject* where(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyList_Check(args[0]) || !PyTuple_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "where(list of tensors, tuple of allowed types)");
    return nullptr;
  }
  try {
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    at::Tensor out = at::empty({static_cast<int64_t>(n), WHERE_WIDTH}, at::kLong);
    int64_t* rows = out.data_ptr<int64_t>();
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor* t = plain(PyList_GET_ITEM(args[0], i), args[1]);
      if (t == nullptr || !recordable(*t) || !stored(*t)) Py_RETURN_NONE;
      write_where(*t, rows + i * WHERE_WIDTH);
    }
    return THPVariable_Wrap(std::move(out));
  } catch (const std::exception&) {
    Py_RETURN_NONE;  // no storage, no device pointer: the Python path says what is wrong
  }
}

// Whether dict d holds exactly the recorded key and value objects, in this order (compared by
// identity: no __hash__ or __eq__ runs, so no Python code at all); each value, borrowed, into out.
bool same_items(PyObject* d, const int64_t* keys, const int64_t* values, Py_ssize_t n, PyObject** out) {
  if (!PyDict_Check(d) || PyDict_GET_SIZE(d) != n) return false;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(d, &pos, &key, &value)) {
    if (i >= n || reinterpret_cast<int64_t>(key) != keys[i] || reinterpret_cast<int64_t>(value) != values[i]) {
      return false;
    }
    out[i++] = value;
  }
  return i == n;
}

// confirm(params, state, record) -> -1 (something differs: the Python path decides), 0 (every
// address as recorded), 1 (as recorded but some grads moved: their addresses are in record's
// grad_ptrs, for the caller to upload). No Python code runs during the call, so the objects read
// from the dicts stay as they were read. record is the tuple _GroupCache.record_fast builds:
//    0 has_grad     int64 [L]: 1 for each entry of params (the group's list) that had a grad
//    1 where_p      int64 [n, W]: the params with grads
//    2 uploaded     int64 [n]: their grads' addresses in the device tables
//    3 aligned      int64 [n]: 1 where the param's bucket needs 16-byte aligned addresses
//    4 slots        int64 [n]: where each param's state dict is in `state`'s order
//    5 state_keys   int64 [K]: ids of `state`'s keys, in order
//    6 state_values int64 [K]: ids of its values
//    7 entry_start  int64 [n + 1]: where each param's state dict's entries start in 8 and 9
//    8 entry_keys   int64 [E]: ids of the keys of each param's state dict, in order
//    9 entry_values int64 [E]: ids of its values
//   10 state_entry  int64 [S]: for each tensor the launch reads, its entry in 8 and 9
//   11 where_s      int64 [S, W]: those tensors
//   12 owned        list [C]: tensors the optimizer owns whose addresses the launch reads (SGD's counters)
//   13 where_o      int64 [C, W]
//   14 grad_ptrs    int64 [n]: written: the grads' addresses
//   15 allowed      tuple: the tensor types taken (torch.Tensor, nn.Parameter)
PyObject* confirm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyList_Check(args[0]) || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 16) {
    PyErr_SetString(PyExc_TypeError, "confirm(params list, state dict, record tuple)");
    return nullptr;
  }
  PyObject* params = args[0];
  PyObject* state = args[1];
  PyObject* const* r = &PyTuple_GET_ITEM(args[2], 0);
  try {
    const at::Tensor& has_grad_t = THPVariable_Unpack(r[0]);
    const int64_t* has_grad = has_grad_t.data_ptr<int64_t>();
    const int64_t* where_p = rows_of(r[1]);
    const int64_t* uploaded = rows_of(r[2]);
    const int64_t* aligned = rows_of(r[3]);
    const int64_t* slots = rows_of(r[4]);
    const at::Tensor& state_keys_t = THPVariable_Unpack(r[5]);
    const int64_t* entry_start = rows_of(r[7]);
    const at::Tensor& entry_keys_t = THPVariable_Unpack(r[8]);
    const int64_t* entry_keys = entry_keys_t.data_ptr<int64_t>();
    const int64_t* entry_values = rows_of(r[9]);
    const at::Tensor& state_entry_t = THPVariable_Unpack(r[10]);
    const int64_t* state_entry = state_entry_t.data_ptr<int64_t>();
    const int64_t* where_s = rows_of(r[11]);
    PyObject* owned = r[12];
    const int64_t* where_o = rows_of(r[13]);
    int64_t* grad_ptrs = rows_of(r[14]);
    PyObject* allowed = r[15];

    const Py_ssize_t nkeys = state_keys_t.numel();
    std::vector<PyObject*> dicts(static_cast<size_t>(nkeys));
    if (!same_items(state, state_keys_t.data_ptr<int64_t>(), rows_of(r[6]), nkeys, dicts.data())) {
      return PyLong_FromLong(-1);
    }
    const Py_ssize_t nentries = entry_keys_t.numel();
    std::vector<PyObject*> entries(static_cast<size_t>(nentries));
    Py_ssize_t length = PyList_GET_SIZE(params);
    if (length != has_grad_t.numel()) return PyLong_FromLong(-1);
    int moved = 0;
    int64_t j = 0;  // index among the params with grads
    for (Py_ssize_t i = 0; i < length; ++i) {
      const at::Tensor* p = plain(PyList_GET_ITEM(params, i), allowed);
      if (p == nullptr) return PyLong_FromLong(-1);
      const at::Tensor& g = p->grad();
      if (g.defined() != (has_grad[i] != 0)) return PyLong_FromLong(-1);
      if (!g.defined()) continue;
      const int64_t* wp = where_p + j * WHERE_WIDTH;
      if (!matches(*p, wp) || !fits(g, wp)) return PyLong_FromLong(-1);  // a grad keeps its param's layout
      int64_t ptr = reinterpret_cast<int64_t>(g.data_ptr());
      if (ptr != uploaded[j]) {
        if (aligned[j] && (ptr % 16) != 0) return PyLong_FromLong(-1);
        moved = 1;
      }
      grad_ptrs[j] = ptr;
      if (slots[j] < 0 || slots[j] >= nkeys) return PyLong_FromLong(-1);
      int64_t first = entry_start[j], count = entry_start[j + 1] - first;
      if (first < 0 || count < 0 || first + count > nentries || !PyDict_CheckExact(dicts[slots[j]]) ||
          !same_items(dicts[slots[j]], entry_keys + first, entry_values + first, count, entries.data() + first)) {
        return PyLong_FromLong(-1);
      }
      ++j;
    }
    if (j + 1 != entry_start_count(r[7])) return PyLong_FromLong(-1);
    const Py_ssize_t nstates = state_entry_t.numel();
    for (Py_ssize_t s = 0; s < nstates; ++s) {
      if (state_entry[s] < 0 || state_entry[s] >= nentries) return PyLong_FromLong(-1);
      const at::Tensor* t = plain(entries[state_entry[s]], allowed);
      if (t == nullptr || !matches(*t, where_s + s * WHERE_WIDTH)) return PyLong_FromLong(-1);
    }
    Py_ssize_t nowned = PyList_GET_SIZE(owned);
    for (Py_ssize_t c = 0; c < nowned; ++c) {
      const at::Tensor* t = plain(PyList_GET_ITEM(owned, c), allowed);
      if (t == nullptr || !matches(*t, where_o + c * WHERE_WIDTH)) return PyLong_FromLong(-1);
    }
    return PyLong_FromLong(moved);
  } catch (const std::exception&) {
    return PyLong_FromLong(-1);
  }
}

PyMethodDef methods[] = {
    {"where", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(where)), METH_FASTCALL,
     "where(tensors, allowed): int64 [n, WHERE_WIDTH] records, or None"},
    {"confirm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(confirm)), METH_FASTCALL,
     "confirm(params, state, record): -1, 0 or 1"},
    {nullptr, nullptr, 0, nullptr}};

#define MECHGPU_STR_(x) #x
#define MECHGPU_STR(x) MECHGPU_STR_(x)
#define MECHGPU_CAT_(a, b) a##b
#define MECHGPU_CAT(a, b) MECHGPU_CAT_(a, b)

PyModuleDef module = {PyModuleDef_HEAD_INIT, MECHGPU_STR(MECHGPU_HOST_NAME), nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC MECHGPU_CAT(PyInit_, MECHGPU_HOST_NAME)(void) {
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddIntConstant(m, "WHERE_WIDTH", WHERE_WIDTH) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
