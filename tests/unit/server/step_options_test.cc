#include "step/step_options.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "status_matchers.h"

namespace muon::server {
namespace {

using ::muon::testing::StatusIs;
using ::testing::HasSubstr;

ParamSpec Spec(std::string name, OptimizerKind kind, std::vector<int64_t> shape) {
  ParamSpec spec;
  spec.name = std::move(name);
  spec.kind = kind;
  spec.shape = std::move(shape);
  spec.hp.lr = kind == OptimizerKind::kMuon ? 0.02 : 1e-3;
  return spec;
}

class StepOptionsTest : public ::testing::Test {
 protected:
  ParamSpec muon_ = Spec("w", OptimizerKind::kMuon, {8, 4});
  ParamSpec adamw_ = Spec("b", OptimizerKind::kAdamW, {4});
  std::vector<const ParamSpec*> specs_ = {&muon_, &adamw_};
};

TEST_F(StepOptionsTest, NothingSetLeavesEveryParameterRegistered) {
  absl::StatusOr<std::vector<ParamStepInput>> inputs =
      StepInputsFromHeader(v1::StepHeader(), specs_);
  ASSERT_TRUE(inputs.ok()) << inputs.status();
  ASSERT_EQ(inputs->size(), 2u);
  for (const ParamStepInput& in : *inputs) {
    EXPECT_FALSE(in.lr.has_value());
    EXPECT_FALSE(in.hyper_params.has_value());
  }
}

TEST_F(StepOptionsTest, PerParameterValuesWinOverTheHeaderAndKeepWhatIsFixed) {
  v1::StepHeader header;
  header.set_lr(0.5);
  header.set_lr_scale(0.25);
  v1::ParamStepOptions* o = header.add_param_options();
  o->set_param_index(0);
  o->mutable_hyper_params()->set_lr(0.04);
  o->mutable_hyper_params()->set_momentum(0.8);
  o->mutable_hyper_params()->set_nesterov(false);
  o->mutable_hyper_params()->set_weight_decay(0.1);
  absl::StatusOr<std::vector<ParamStepInput>> inputs =
      StepInputsFromHeader(header, specs_);
  ASSERT_TRUE(inputs.ok()) << inputs.status();
  const ParamStepInput& w = (*inputs)[0];
  EXPECT_EQ(w.lr, 0.04 * 0.25);
  ASSERT_TRUE(w.hyper_params.has_value());
  EXPECT_EQ(w.hyper_params->momentum, 0.8);
  EXPECT_FALSE(w.hyper_params->nesterov);
  EXPECT_EQ(w.hyper_params->weight_decay, 0.1);
  EXPECT_EQ(w.hyper_params->ns_steps, muon_.hp.ns_steps);
  const ParamStepInput& b = (*inputs)[1];  // not listed: the header's lr
  EXPECT_EQ(b.lr, 0.5 * 0.25);
  EXPECT_FALSE(b.hyper_params.has_value());
}

TEST_F(StepOptionsTest, RefusesWhatAStepCannotSet) {
  struct Case {
    uint32_t index;
    void (*set)(v1::HyperParams*);
    const char* message;
  };
  const Case cases[] = {
      {0, [](v1::HyperParams* h) { h->set_ns_steps(3); }, "fixed when the session is created"},
      {0, [](v1::HyperParams* h) { h->set_shape_scale(v1::SHAPE_SCALE_NONE); },
       "fixed when the session is created"},
      {0, [](v1::HyperParams* h) { h->add_ns_coefficients()->set_a(3); },
       "fixed when the session is created"},
      {0, [](v1::HyperParams* h) { h->set_ns_eps(1e-5); }, "fixed when the session is created"},
      {0, [](v1::HyperParams* h) { h->set_momentum(1.0); }, "momentum is 1; it must be in [0, 1)"},
      {1, [](v1::HyperParams* h) { h->set_adam_eps(0); }, "adam_eps is 0; it must be finite and > 0"},
      {1, [](v1::HyperParams* h) { h->set_weight_decay(-1); }, "weight_decay is -1"},
      {2, [](v1::HyperParams* h) { h->set_momentum(0.5); }, "names parameter 2"},
  };
  for (const Case& c : cases) {
    v1::StepHeader header;
    v1::ParamStepOptions* o = header.add_param_options();
    o->set_param_index(c.index);
    c.set(o->mutable_hyper_params());
    EXPECT_THAT(StepInputsFromHeader(header, specs_).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.message)))
        << c.message;
  }
  v1::StepHeader twice;
  twice.add_param_options()->set_param_index(1);
  twice.add_param_options()->set_param_index(1);
  EXPECT_THAT(StepInputsFromHeader(twice, specs_).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("twice")));
}

}  // namespace
}  // namespace muon::server
