// Host build: the CUDA API comes from the emulation layer.
#pragma once
#include "../cuda_emulation.h"
