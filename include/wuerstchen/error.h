#pragma once

// Every error the library throws derives from wuerstchen::Error, so a caller can catch one type.
// Messages name the file, key or argument at fault.

#include <stdexcept>
#include <string>

namespace wuerstchen {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A config.json / model_index.json field is missing a required value, has the wrong type or an
// impossible value.
class ConfigError : public Error {
public:
    using Error::Error;
};

// A weight file does not match the module: missing, unexpected or mis-shaped tensors, or a
// malformed safetensors file.
class WeightError : public Error {
public:
    using Error::Error;
};

// A tokenizer folder cannot be read or is inconsistent.
class TokenizerError : public Error {
public:
    using Error::Error;
};

// A caller passed an argument the pipeline cannot honour.
class InvalidArgument : public Error {
public:
    using Error::Error;
};

// A file or folder cannot be opened, read or written.
class IoError : public Error {
public:
    using Error::Error;
};

// Memory ran out during a pipeline call (CUDA or host). The message suggests what to change
// (offload, fewer images, a smaller size); the pipeline stays usable.
class OutOfMemoryError : public Error {
public:
    using Error::Error;
};

// A step callback returned false: the call stopped early. The pipeline stays usable.
class Cancelled : public Error {
public:
    using Error::Error;
};

}  // namespace wuerstchen
