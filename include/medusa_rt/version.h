// medusa_rt — version of the library and of the runtime model format it reads.
#pragma once

#include <string>

#define MEDUSA_RT_VERSION_MAJOR 0
#define MEDUSA_RT_VERSION_MINOR 1
#define MEDUSA_RT_VERSION_PATCH 0
#define MEDUSA_RT_VERSION_STRING "0.1.0"
#define MEDUSA_RT_VERSION_NUMBER (MEDUSA_RT_VERSION_MAJOR * 10000 + MEDUSA_RT_VERSION_MINOR * 100 + MEDUSA_RT_VERSION_PATCH)

// The runtime model format (config.json "format_version") this build reads.
#define MEDUSA_RT_FORMAT_VERSION 1

#include "medusa_rt/errors.h"

namespace medusa_rt {

/// The library version the program is running against (may differ from the header's
/// MEDUSA_RT_VERSION_STRING when a program is linked against a newer shared library).
const char* version();
/// The same as MEDUSA_RT_VERSION_NUMBER, as compiled into the library.
int version_number();

/// Throws medusa_rt::Error when the shared library loaded at run time is not ABI compatible
/// with the headers the program was compiled with (a different major version, or before 1.0
/// a different minor version). Call it once at start-up.
inline void check_version() {
  const int lib = version_number();
  const int hdr = MEDUSA_RT_VERSION_NUMBER;
  const bool same = MEDUSA_RT_VERSION_MAJOR == 0 ? lib / 100 == hdr / 100 : lib / 10000 == hdr / 10000;
  if (!same) {
    throw Error(std::string("medusa_rt version mismatch: compiled against ") + MEDUSA_RT_VERSION_STRING +
                " but running with " + version());
  }
}

}  // namespace medusa_rt
