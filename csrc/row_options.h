// The per-row options every op takes, listed once for the op schemas
// (csrc/ops.cpp) and the backends' entry points (csrc/binding.h):
//   X(C++ type, name, schema type, schema default)
// FSCE_ROW_OPTIONS follow an op's tensors: ignore_index, label_smoothing and
// the logit transform (logit_scale, then softcap; 0 for none).
// FSCE_SHARD_OPTIONS end every row op: the vocab-parallel shard's classes
// [class_offset, class_offset + C) of total_classes (-1: the logits' C).
// A new option is one line here, a field of CEParams that prepare() fills
// (csrc/binding.cpp), and the Python LossOptions.
#pragma once

#define FSCE_ROW_OPTIONS(X)                    \
  X(int64_t, ignore_index, "int", "")          \
  X(double, label_smoothing, "float", "")      \
  X(double, logit_scale, "float", "=1.0")      \
  X(double, softcap, "float", "=0.0")
#define FSCE_SHARD_OPTIONS(X)                  \
  X(int64_t, class_offset, "int", "=0")        \
  X(int64_t, total_classes, "int", "=-1")

// ", float softcap=0.0" in a schema string.
#define FSCE_OPTION_SCHEMA(type, name, schema_type, schema_default) ", " schema_type " " #name schema_default
// ", double softcap" in a parameter list.
#define FSCE_OPTION_PARAM(type, name, ...) , type name
// "softcap," in a braced initialiser.
#define FSCE_OPTION_VALUE(type, name, ...) name,
// "double softcap;" in a struct.
#define FSCE_OPTION_MEMBER(type, name, ...) type name;
