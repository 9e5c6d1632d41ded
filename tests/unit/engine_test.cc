// The Engine contract suite (tests/support/engine_suite.cc) on the CPU engine,
// with the default (fp32) tolerances.
#include "engine_suite.h"

MUON_INSTANTIATE_ENGINE_SUITE(Cpu, ::muon::testing::CpuEngineUnderTest());
