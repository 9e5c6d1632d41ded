#ifndef MUON_TESTS_INTEGRATION_CLIENT_DRIVER_H_
#define MUON_TESTS_INTEGRATION_CLIENT_DRIVER_H_

// Steps through the real C++ client (muon::Client), in the harness's terms.

#include <memory>
#include <optional>

#include "muon/client/client.h"
#include "server_process.h"
#include "step_harness.h"

namespace muon::testing {

// A client of `server` cutting gradients into `chunk_bytes` chunks.
std::unique_ptr<Client> NewClient(const ServerProcess& server, size_t chunk_bytes = 1000,
                                  int max_step_attempts = 20);

// One step through the client: the updates it hands out (only after the
// summary) and the summary; status carries the client's final error.
StepResult ClientStep(Client* client, const SessionHandle& session, uint64_t step,
                      const Tensors& grads, const muon::StepCallOptions& options = {});

}  // namespace muon::testing

#endif  // MUON_TESTS_INTEGRATION_CLIENT_DRIVER_H_
