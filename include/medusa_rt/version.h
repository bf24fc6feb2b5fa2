// medusa_rt — version of the library and of the runtime model format it reads.
#pragma once

#define MEDUSA_RT_VERSION_MAJOR 0
#define MEDUSA_RT_VERSION_MINOR 1
#define MEDUSA_RT_VERSION_PATCH 0
#define MEDUSA_RT_VERSION_STRING "0.1.0"

// The runtime model format (config.json "format_version") this build reads.
#define MEDUSA_RT_FORMAT_VERSION 1

namespace medusa_rt {

/// The library version the program is running against (may differ from the header's
/// MEDUSA_RT_VERSION_STRING when a program is linked against a newer shared library).
const char* version();

}  // namespace medusa_rt
