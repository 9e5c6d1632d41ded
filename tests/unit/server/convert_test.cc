// wire/convert: proto ⇄ engine types, and the refusal of every value outside
// its range or its enum, where a parameter's optimizer would not use it too.
#include "wire/convert.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace muon::server {
namespace {

using ::testing::HasSubstr;

v1::CreateSessionRequest Request() {
  v1::CreateSessionRequest r;
  v1::ParameterSpec* w = r.add_params();
  w->set_name("w");
  w->add_shape(8);
  w->add_shape(4);
  v1::ParameterSpec* b = r.add_params();
  b->set_name("b");
  b->add_shape(4);
  return r;
}

void ExpectInvalid(const absl::Status& status, const std::string& substring) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(substring));
}

TEST(SpecsFromRequestTest, ResolvesDefaultsAndKinds) {
  absl::StatusOr<std::vector<ParamSpec>> specs = SpecsFromRequest(Request());
  ASSERT_TRUE(specs.ok()) << specs.status();
  ASSERT_EQ(specs->size(), 2u);
  EXPECT_EQ((*specs)[0].kind, OptimizerKind::kMuon);
  EXPECT_EQ((*specs)[1].kind, OptimizerKind::kAdamW);
  EXPECT_EQ((*specs)[1].hp.momentum, HyperParams{}.momentum);
}

TEST(SpecsFromRequestTest, HyperParametersOutOfRangeAreRefusedWhereUnused) {
  {
    v1::CreateSessionRequest r = Request();  // 'b' is AdamW: momentum unused
    r.mutable_params(1)->mutable_overrides()->set_momentum(1.5);
    ExpectInvalid(SpecsFromRequest(r).status(), "parameter 1 ('b')");
    ExpectInvalid(SpecsFromRequest(r).status(), "momentum is 1.5");
  }
  {
    v1::CreateSessionRequest r = Request();  // 'w' is Muon: beta1 unused
    r.mutable_params(0)->mutable_overrides()->set_adam_beta1(-0.5);
    ExpectInvalid(SpecsFromRequest(r).status(), "adam_beta1 is -0.5");
  }
  {
    v1::CreateSessionRequest r = Request();
    r.mutable_params(0)->mutable_overrides()->set_ns_schedule(v1::NS_SCHEDULE_SVD);
    r.mutable_params(0)->mutable_overrides()->set_ns_steps(0);
    ExpectInvalid(SpecsFromRequest(r).status(), "ns_steps is 0");
  }
  {
    v1::CreateSessionRequest r = Request();  // no Muon parameter reads adamw_hyper_params
    r.mutable_adamw_hyper_params()->set_ns_steps(1000);
    ExpectInvalid(SpecsFromRequest(r).status(), "adamw_hyper_params: ns_steps is 1000");
  }
  {
    v1::CreateSessionRequest r = Request();
    r.mutable_hyper_params()->set_adam_eps(std::numeric_limits<double>::infinity());
    ExpectInvalid(SpecsFromRequest(r).status(), "hyper_params: adam_eps");
  }
  {
    v1::CreateSessionRequest r = Request();
    r.mutable_hyper_params()->set_lr(1e200);
    r.mutable_hyper_params()->set_weight_decay(1e200);
    ExpectInvalid(SpecsFromRequest(r).status(), "lr·weight_decay");
  }
}

void AddTriple(v1::HyperParams* hp, double a, double b, double c) {
  v1::HyperParams::NsCoefficients* t = hp->add_ns_coefficients();
  t->set_a(a);
  t->set_b(b);
  t->set_c(c);
}

TEST(SpecsFromRequestTest, CustomScheduleAndNsEpsAreResolvedAndReturned) {
  v1::CreateSessionRequest r = Request();
  AddTriple(r.mutable_hyper_params(), 4, -6, 3);
  AddTriple(r.mutable_hyper_params(), 3, -4, 2);
  r.mutable_hyper_params()->set_ns_eps(1e-5);
  // A third parameter takes a built-in schedule instead.
  *r.add_params() = r.params(0);
  r.mutable_params(2)->set_name("v");
  r.mutable_params(2)->mutable_overrides()->set_ns_schedule(v1::NS_SCHEDULE_DION);
  absl::StatusOr<std::vector<ParamSpec>> specs = SpecsFromRequest(r);
  ASSERT_TRUE(specs.ok()) << specs.status();
  const HyperParams& w = (*specs)[0].hp;
  using Triples = std::vector<std::array<double, 3>>;
  EXPECT_EQ(w.ns_coefficients, (Triples{{4, -6, 3}, {3, -4, 2}}));
  EXPECT_EQ(w.ns_steps, 2);  // the list's length, ns_steps being unset
  EXPECT_EQ(w.ns_eps, 1e-5);
  EXPECT_EQ(w.ns_schedule, ScheduleKind::kJordan);
  const HyperParams& v = (*specs)[2].hp;
  EXPECT_TRUE(v.ns_coefficients.empty());
  EXPECT_EQ(v.ns_schedule, ScheduleKind::kDion);
  EXPECT_EQ(v.ns_eps, 1e-5);
  // What GetSession returns reads back as the same hyper-parameters.
  v1::HyperParams out;
  HyperParamsToProto(w, &out);
  absl::StatusOr<HyperParams> back = ApplyOverrides(HyperParams{}, out, "test");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ns_coefficients, w.ns_coefficients);
  EXPECT_EQ(back->ns_steps, 2);
  EXPECT_EQ(back->ns_eps, 1e-5);
}

TEST(SpecsFromRequestTest, BadCustomSchedulesAndNsEpsAreRefused) {
  {
    v1::CreateSessionRequest r = Request();
    AddTriple(r.mutable_hyper_params(), 3, std::nan(""), 1);
    ExpectInvalid(SpecsFromRequest(r).status(), "hyper_params: ns_coefficients step 0");
  }
  {
    v1::CreateSessionRequest r = Request();
    AddTriple(r.mutable_hyper_params(), 3, -3, 1);
    AddTriple(r.mutable_hyper_params(), 3, -3, 1);
    r.mutable_hyper_params()->set_ns_steps(5);
    ExpectInvalid(SpecsFromRequest(r).status(),
                  "ns_coefficients has 2 per-step triples but ns_steps is 5");
  }
  {
    v1::CreateSessionRequest r = Request();
    AddTriple(r.mutable_params(0)->mutable_overrides(), 3, -3, 1);
    r.mutable_params(0)->mutable_overrides()->set_ns_schedule(v1::NS_SCHEDULE_AOL);
    ExpectInvalid(SpecsFromRequest(r).status(), "ns_schedule is aol");
  }
  {
    v1::CreateSessionRequest r = Request();
    r.mutable_hyper_params()->set_ns_eps(-1e-7);
    ExpectInvalid(SpecsFromRequest(r).status(), "ns_eps is -1e-07");
  }
}

TEST(SpecsFromRequestTest, EnumsOutsideTheirValuesAreRefused) {
  const auto with = [](auto edit) {
    v1::CreateSessionRequest r = Request();
    edit(r);
    return SpecsFromRequest(r).status();
  };
  ExpectInvalid(with([](auto& r) { r.mutable_params(0)->set_dtype(static_cast<v1::DType>(4)); }),
                "dtype");
  ExpectInvalid(
      with([](auto& r) { r.mutable_params(0)->set_kind(static_cast<v1::OptimizerKind>(3)); }),
      "kind");
  ExpectInvalid(with([](auto& r) {
                  r.mutable_hyper_params()->set_momentum_form(static_cast<v1::MomentumForm>(3));
                }),
                "momentum_form");
  ExpectInvalid(with([](auto& r) {
                  r.mutable_params(1)->mutable_overrides()->set_ns_schedule(
                      static_cast<v1::NsSchedule>(7));
                }),
                "ns_schedule");
  ExpectInvalid(with([](auto& r) {
                  r.mutable_adamw_hyper_params()->set_shape_scale(static_cast<v1::ShapeScale>(4));
                }),
                "shape_scale");
}

TEST(ValidateStepHeaderTest, RefusesEnumsAndRatesOutOfRange) {
  EXPECT_TRUE(ValidateStepHeader(v1::StepHeader()).ok());
  v1::StepHeader good;
  good.set_lr(0.01);
  good.set_lr_scale(0.5);
  good.set_update_dtype(v1::DTYPE_BFLOAT16);
  good.set_update_content(v1::UPDATE_CONTENT_WEIGHTS);
  EXPECT_TRUE(ValidateStepHeader(good).ok());
  const auto with = [&](auto edit) {
    v1::StepHeader h = good;
    edit(h);
    return ValidateStepHeader(h);
  };
  ExpectInvalid(with([](auto& h) { h.set_update_content(static_cast<v1::UpdateContent>(9)); }),
                "update_content value 9");
  ExpectInvalid(with([](auto& h) { h.set_update_dtype(static_cast<v1::DType>(17)); }),
                "update_dtype");
  ExpectInvalid(with([](auto& h) { h.set_lr(-1); }), "StepHeader.lr is -1");
  ExpectInvalid(with([](auto& h) { h.set_lr_scale(std::nan("")); }), "lr_scale");
  ExpectInvalid(with([](auto& h) {
                  h.set_lr(1e300);
                  h.set_lr_scale(1e300);
                }),
                "overflows");
}

}  // namespace
}  // namespace muon::server
