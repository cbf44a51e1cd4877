// The parts of the DLPack ABI (dmlc/dlpack, v1.2+) that fastclip uses: the
// DLTensor a framework fills for a Python tensor object, and the C exchange
// API table a framework publishes as `type(tensor).__dlpack_c_exchange_api__`
// (a PyCapsule named "dlpack_exchange_api"; torch >= 2.10 has one).
//
// Declared here from the DLPack specification so that fastclip builds
// without torch or dlpack headers; the layouts are DLPack's stable C ABI.
#pragma once

#include <cstdint>

namespace fastclip::dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kOpaqueHandle = 3, kBfloat = 4, kComplex = 5, kBool = 6 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; may be null for a compact row-major tensor
  uint64_t byte_offset;
};

struct Version {
  uint32_t major;
  uint32_t minor;
};

struct ExchangeApiHeader {
  Version version;
  ExchangeApiHeader* prev_api;
};

// Only the entries fastclip calls are typed; the others keep their slots.
struct ExchangeApi {
  ExchangeApiHeader header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  // Fills `out` for a tensor of the publishing type, without allocating; the
  // view is valid until control returns to Python.  0, or -1 with a Python
  // exception set.
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);
  // The producer's current stream for a device (null for the CPU).
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_stream);
};

}  // namespace fastclip::dlpack
