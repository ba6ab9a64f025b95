// Precompiled header: the heavy, stable torch headers used across the library.
#pragma once

#include <torch/nn.h>
#include <torch/types.h>
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <vector>
