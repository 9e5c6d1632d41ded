// End-to-end security: the real muon-server binary with TLS, mutual TLS,
// session tokens and an admin token, driven by the real client (and the
// generated stub for requests the client would not send). Certificates are
// made with the openssl CLI into a temporary directory.

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client_driver.h"
#include "server_process.h"
#include "step_harness.h"

namespace muon::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

#define EXPECT_CODE(result_status, code)                                      \
  do {                                                                        \
    const grpc::Status& s_ = (result_status);                                 \
    EXPECT_EQ(s_.error_code(), grpc::StatusCode::code) << s_.error_message(); \
  } while (0)

#define EXPECT_ABSL_CODE(result_status, want)                     \
  do {                                                            \
    const absl::Status s_ = (result_status);                      \
    EXPECT_EQ(s_.code(), absl::StatusCode::want) << s_.message(); \
  } while (0)

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::trunc);
  out << contents;
}

// A temporary directory holding two CAs and certificates, made once per
// test suite: ca/server (subjectAltName IP:127.0.0.1, DNS:localhost),
// ca/client, and other-ca/other-client, whose client must be refused.
class Certificates {
 public:
  static absl::StatusOr<std::unique_ptr<Certificates>> Make() {
    std::unique_ptr<Certificates> c(new Certificates());
    char dir[] = "/tmp/muon-certs-XXXXXX";
    if (mkdtemp(dir) == nullptr) return absl::InternalError("mkdtemp failed");
    c->dir_ = dir;
    WriteFile(c->Path("server.ext"),
              "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
    WriteFile(c->Path("client.ext"), "extendedKeyUsage=clientAuth\n");
    for (const char* ca : {"ca", "other-ca"}) {
      if (!c->Run(absl::StrCat("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
                               "-nodes -days 2 -subj /CN=",
                               ca, " -addext basicConstraints=critical,CA:TRUE -keyout ",
                               c->Path(absl::StrCat(ca, ".key")), " -out ",
                               c->Path(absl::StrCat(ca, ".pem"))))) {
        return absl::InternalError(absl::StrCat("openssl could not make ", ca, " in ", c->dir_));
      }
    }
    struct Leaf {
      const char* name;
      const char* ca;
      const char* ext;
    };
    for (const Leaf& leaf : {Leaf{"server", "ca", "server.ext"}, Leaf{"client", "ca", "client.ext"},
                             Leaf{"other-client", "other-ca", "client.ext"}}) {
      const std::string name = leaf.name;
      const std::string ca = leaf.ca;
      if (!c->Run(absl::StrCat("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
                               "-nodes -subj /CN=",
                               name, " -keyout ", c->Path(name + ".key"), " -out ",
                               c->Path(name + ".csr"))) ||
          !c->Run(absl::StrCat("openssl x509 -req -days 2 -in ", c->Path(name + ".csr"), " -CA ",
                               c->Path(ca + ".pem"), " -CAkey ", c->Path(ca + ".key"),
                               " -CAcreateserial -extfile ", c->Path(leaf.ext), " -out ",
                               c->Path(name + ".pem")))) {
        return absl::InternalError(absl::StrCat("openssl could not make ", name, " in ", c->dir_));
      }
    }
    return c;
  }

  ~Certificates() {
    if (!dir_.empty()) std::system(absl::StrCat("rm -rf '", dir_, "'").c_str());
  }

  std::string Path(const std::string& name) const { return absl::StrCat(dir_, "/", name); }

 private:
  Certificates() = default;
  bool Run(const std::string& command) const {
    return std::system((command + " >/dev/null 2>&1").c_str()) == 0;
  }
  std::string dir_;
};

// A session with one 64x32 Muon parameter, so steps are quick.
Model TinyModel() {
  Model model = SmallModel();
  model.params.resize(1);
  model.specs.resize(1);
  return model;
}

absl::StatusOr<std::unique_ptr<Client>> TlsClient(const ServerProcess& server,
                                                  const ClientTlsOptions& tls) {
  ClientOptions options;
  options.target = server.address();
  options.tls = tls;
  options.max_step_attempts = 1;
  options.call_timeout = absl::Seconds(10);
  return Client::Create(options);
}

// CreateSession and one step: the whole path works over this client.
absl::Status CreateAndStep(Client* client) {
  const Model model = TinyModel();
  absl::StatusOr<SessionHandle> session = client->CreateSession(CreateRequest(model));
  if (!session.ok()) return session.status();
  StepResult result = ClientStep(client, *session, 1, RandomGradients(model, 7));
  if (!result.status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(result.status.error_code()),
                        result.status.error_message());
  }
  if (!result.summary.has_value() || result.summary->step() != 1) {
    return absl::InternalError("the step has no summary for step 1");
  }
  return client->DeleteSession(*session);
}

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto certs = Certificates::Make();
    ASSERT_TRUE(certs.ok()) << certs.status();
    certs_ = certs->release();
  }
  static void TearDownTestSuite() {
    delete certs_;
    certs_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(certs_, nullptr); }

  std::unique_ptr<ServerProcess> StartServer(bool mutual) {
    std::vector<std::string> flags = {"--tls_cert=" + certs_->Path("server.pem"),
                                      "--tls_key=" + certs_->Path("server.key")};
    if (mutual) flags.push_back("--tls_client_ca=" + certs_->Path("ca.pem"));
    auto server = ServerProcess::Start(flags, /*capture_stderr=*/true);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? std::move(*server) : nullptr;
  }

  static Certificates* certs_;
};

Certificates* TlsTest::certs_ = nullptr;

TEST_F(TlsTest, TlsWorksEndToEnd) {
  std::unique_ptr<ServerProcess> server = StartServer(/*mutual=*/false);
  ASSERT_NE(server, nullptr);
  auto client = TlsClient(*server, {.ca_file = certs_->Path("ca.pem")});
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_TRUE(CreateAndStep(client->get()).ok()) << CreateAndStep(client->get());
  // By DNS name too, through the override (the certificate has both).
  auto by_name =
      TlsClient(*server, {.ca_file = certs_->Path("ca.pem"), .server_name = "localhost"});
  ASSERT_TRUE(by_name.ok()) << by_name.status();
  EXPECT_TRUE((*by_name)->Health().ok()) << (*by_name)->Health().status();
}

TEST_F(TlsTest, PlaintextClientIsRefused) {
  std::unique_ptr<ServerProcess> server = StartServer(/*mutual=*/false);
  ASSERT_NE(server, nullptr);
  auto plain = TlsClient(*server, {});
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_ABSL_CODE(CreateAndStep(plain->get()), kUnavailable);
}

TEST_F(TlsTest, ServerCertificateFromAnotherCaIsRefused) {
  std::unique_ptr<ServerProcess> server = StartServer(/*mutual=*/false);
  ASSERT_NE(server, nullptr);
  auto client = TlsClient(*server, {.ca_file = certs_->Path("other-ca.pem")});
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_ABSL_CODE(CreateAndStep(client->get()), kUnavailable);
}

TEST_F(TlsTest, MutualTlsNeedsACertificateFromTheClientCa) {
  std::unique_ptr<ServerProcess> server = StartServer(/*mutual=*/true);
  ASSERT_NE(server, nullptr);
  const std::string ca = certs_->Path("ca.pem");

  auto no_cert = TlsClient(*server, {.ca_file = ca});
  ASSERT_TRUE(no_cert.ok()) << no_cert.status();
  EXPECT_ABSL_CODE(CreateAndStep(no_cert->get()), kUnavailable);

  auto wrong_ca = TlsClient(*server, {.ca_file = ca,
                                      .cert_file = certs_->Path("other-client.pem"),
                                      .key_file = certs_->Path("other-client.key")});
  ASSERT_TRUE(wrong_ca.ok()) << wrong_ca.status();
  EXPECT_ABSL_CODE(CreateAndStep(wrong_ca->get()), kUnavailable);

  auto right = TlsClient(*server, {.ca_file = ca,
                                   .cert_file = certs_->Path("client.pem"),
                                   .key_file = certs_->Path("client.key")});
  ASSERT_TRUE(right.ok()) << right.status();
  EXPECT_TRUE(CreateAndStep(right->get()).ok()) << CreateAndStep(right->get());
}

TEST_F(TlsTest, BadTlsFlagsStopTheServerWithAReason) {
  auto only_cert = ServerProcess::Start({"--tls_cert=" + certs_->Path("server.pem")}, true);
  ASSERT_FALSE(only_cert.ok());
  EXPECT_THAT(only_cert.status().message(), HasSubstr("needs both --tls_cert and --tls_key"));

  auto missing = ServerProcess::Start(
      {"--tls_cert=" + certs_->Path("absent.pem"), "--tls_key=" + certs_->Path("server.key")},
      true);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("cannot read --tls_cert="));

  auto not_pem = ServerProcess::Start(
      {"--tls_cert=" + certs_->Path("server.pem"), "--tls_key=" + certs_->Path("client.ext")},
      true);
  ASSERT_FALSE(not_pem.ok());
  EXPECT_THAT(not_pem.status().message(), HasSubstr("is not a PEM file"));

  auto ca_alone = ServerProcess::Start({"--tls_client_ca=" + certs_->Path("ca.pem")}, true);
  ASSERT_FALSE(ca_alone.ok());
  EXPECT_THAT(ca_alone.status().message(), HasSubstr("--tls_client_ca (mutual TLS) needs"));
}

TEST_F(TlsTest, ClientRejectsBadTlsOptions) {
  ClientOptions options;
  options.target = "127.0.0.1:1";
  options.tls.cert_file = certs_->Path("client.pem");
  EXPECT_ABSL_CODE(Client::Create(options).status(), kInvalidArgument);
  options.tls.key_file = certs_->Path("absent.key");
  EXPECT_ABSL_CODE(Client::Create(options).status(), kInvalidArgument);
}

// ---------------------------------------------------------------------------
// Tokens.

constexpr char kAdminToken[] = "admin-0f3c9a5e7d21b4c8";

class TokenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char dir[] = "/tmp/muon-admin-XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    dir_ = new std::string(dir);
    WriteFile(*dir_ + "/admin", absl::StrCat(kAdminToken, "\n"));
    auto server = ServerProcess::Start({"--admin_token_file=" + *dir_ + "/admin"},
                                       /*capture_stderr=*/true);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    if (dir_ != nullptr) {
      std::remove((*dir_ + "/admin").c_str());
      rmdir(dir_->c_str());
    }
    delete dir_;
    dir_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Optimizer::NewStub(server_->NewChannel());
    client_ = NewClient(*server_);
    ASSERT_NE(client_, nullptr);
    a_ = NewSession(v1::SESSION_MODE_UPDATES);
    b_ = NewSession(v1::SESSION_MODE_UPDATES);
  }

  void TearDown() override {
    // Whatever a test left; the server's stderr must not hold any token.
    for (const SessionHandle* s : {&a_, &b_}) {
      grpc::ClientContext ctx;
      v1::DeleteSessionRequest request;
      request.set_session_id(s->id);
      request.set_token(s->token);
      v1::DeleteSessionResponse response;
      stub_->DeleteSession(&ctx, request, &response);
    }
    const std::string err = server_->Stderr();
    EXPECT_THAT(err, HasSubstr("serving muon.v1.Optimizer"));  // stderr is captured
    for (const std::string& secret : secrets_) EXPECT_THAT(err, Not(HasSubstr(secret)));
  }

  SessionHandle NewSession(v1::SessionMode mode) {
    v1::CreateSessionRequest request = CreateRequest(TinyModel());
    request.set_mode(mode);
    absl::StatusOr<SessionHandle> handle = client_->CreateSession(request);
    EXPECT_TRUE(handle.ok()) << handle.status();
    if (!handle.ok()) return {};
    EXPECT_EQ(handle->token.size(), 32u);  // 128 bits in hex
    secrets_.push_back(handle->token);
    return *handle;
  }

  grpc::Status GetSession(const std::string& id, const std::string& token,
                          const std::string& bearer = "", v1::SessionInfo* info = nullptr) {
    grpc::ClientContext ctx;
    if (!bearer.empty()) ctx.AddMetadata("authorization", "Bearer " + bearer);
    v1::GetSessionRequest request;
    request.set_session_id(id);
    request.set_token(token);
    v1::SessionInfo ignored;
    return stub_->GetSession(&ctx, request, info == nullptr ? &ignored : info);
  }

  grpc::Status DeleteSession(const std::string& id, const std::string& token,
                             const std::string& bearer = "") {
    grpc::ClientContext ctx;
    if (!bearer.empty()) ctx.AddMetadata("authorization", "Bearer " + bearer);
    v1::DeleteSessionRequest request;
    request.set_session_id(id);
    request.set_token(token);
    v1::DeleteSessionResponse response;
    return stub_->DeleteSession(&ctx, request, &response);
  }

  grpc::Status ListSessions(const std::string& admin_token, const std::string& bearer = "",
                            v1::ListSessionsResponse* response = nullptr) {
    grpc::ClientContext ctx;
    if (!bearer.empty()) ctx.AddMetadata("authorization", "Bearer " + bearer);
    v1::ListSessionsRequest request;
    request.set_admin_token(admin_token);
    v1::ListSessionsResponse ignored;
    return stub_->ListSessions(&ctx, request, response == nullptr ? &ignored : response);
  }

  grpc::Status PushWeights(const std::string& id, const std::string& token, const Tensors& w) {
    grpc::ClientContext ctx;
    v1::PushWeightsResponse response;
    auto writer = stub_->PushWeights(&ctx, &response);
    v1::PushWeightsRequest header;
    header.mutable_header()->set_session_id(id);
    header.mutable_header()->set_token(token);
    writer->Write(header);
    for (const v1::StepRequest& m : GradientMessages(w, 1000, 3)) {
      v1::PushWeightsRequest r;
      *r.mutable_weights() = m.gradient();
      if (!writer->Write(r)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }

  grpc::Status PullWeights(const std::string& id, const std::string& token, Tensors* out,
                           const std::string& bearer = "") {
    grpc::ClientContext ctx;
    if (!bearer.empty()) ctx.AddMetadata("authorization", "Bearer " + bearer);
    v1::PullWeightsRequest r;
    r.set_session_id(id);
    r.set_token(token);
    auto reader = stub_->PullWeights(&ctx, r);
    v1::PullWeightsResponse response;
    while (reader->Read(&response)) {
      Bytes& dst = (*out)[response.weights().param_index()];
      dst.resize(response.total_bytes());
      std::memcpy(dst.data() + response.weights().offset(), response.weights().data().data(),
                  response.weights().data().size());
    }
    return reader->Finish();
  }

  uint64_t StepOf(const SessionHandle& s) {
    v1::SessionInfo info;
    grpc::Status status = GetSession(s.id, s.token, "", &info);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return info.step();
  }

  static ServerProcess* server_;
  static std::string* dir_;
  std::unique_ptr<v1::Optimizer::Stub> stub_;
  std::unique_ptr<Client> client_;
  SessionHandle a_, b_;
  std::vector<std::string> secrets_ = {kAdminToken};
};

ServerProcess* TokenTest::server_ = nullptr;
std::string* TokenTest::dir_ = nullptr;

TEST_F(TokenTest, GetSessionNeedsItsOwnToken) {
  EXPECT_CODE(GetSession(b_.id, a_.token), PERMISSION_DENIED);
  const grpc::Status missing = GetSession(b_.id, "");
  EXPECT_CODE(missing, UNAUTHENTICATED);
  EXPECT_THAT(missing.error_message(),
              HasSubstr("needs the token CreateSession returned for session " + b_.id));
  EXPECT_TRUE(GetSession(b_.id, b_.token).ok());
  // A token one character short of the right one.
  EXPECT_CODE(GetSession(b_.id, b_.token.substr(1)), PERMISSION_DENIED);
}

TEST_F(TokenTest, BearerMetadataCarriesTheToken) {
  EXPECT_TRUE(GetSession(b_.id, "", b_.token).ok());
  EXPECT_CODE(GetSession(b_.id, "", a_.token), PERMISSION_DENIED);
  // The request's field wins over the metadata.
  EXPECT_CODE(GetSession(b_.id, a_.token, b_.token), PERMISSION_DENIED);
  Tensors ignored;
  EXPECT_CODE(PullWeights(b_.id, "", &ignored, a_.token), PERMISSION_DENIED);
}

TEST_F(TokenTest, StepNeedsItsOwnTokenAndChangesNothingWithout) {
  const Tensors grads = RandomGradients(TinyModel(), 11);
  SessionHandle wrong = b_;
  wrong.token = a_.token;
  EXPECT_CODE(ClientStep(client_.get(), wrong, 1, grads).status, PERMISSION_DENIED);
  wrong.token = "";
  EXPECT_CODE(ClientStep(client_.get(), wrong, 1, grads).status, UNAUTHENTICATED);
  EXPECT_EQ(StepOf(b_), 0u);
  EXPECT_EQ(StepOf(a_), 0u);
  StepResult right = ClientStep(client_.get(), b_, 1, grads);
  EXPECT_TRUE(right.status.ok()) << right.status.error_message();
  EXPECT_EQ(StepOf(b_), 1u);
}

TEST_F(TokenTest, DeleteSessionNeedsItsOwnToken) {
  EXPECT_CODE(DeleteSession(b_.id, a_.token), PERMISSION_DENIED);
  EXPECT_CODE(DeleteSession(b_.id, ""), UNAUTHENTICATED);
  EXPECT_TRUE(GetSession(b_.id, b_.token).ok());  // still there
  EXPECT_TRUE(DeleteSession(b_.id, b_.token).ok());
  EXPECT_CODE(GetSession(b_.id, b_.token), NOT_FOUND);
}

TEST_F(TokenTest, WeightsNeedTheSessionsToken) {
  const SessionHandle p = NewSession(v1::SESSION_MODE_PARAMETER_SERVER);
  const Tensors weights = RandomGradients(TinyModel(), 21);
  const Tensors other = RandomGradients(TinyModel(), 22);
  ASSERT_TRUE(PushWeights(p.id, p.token, weights).ok());

  EXPECT_CODE(PushWeights(p.id, a_.token, other), PERMISSION_DENIED);
  EXPECT_CODE(PushWeights(p.id, "", other), UNAUTHENTICATED);
  Tensors pulled;
  EXPECT_CODE(PullWeights(p.id, a_.token, &pulled), PERMISSION_DENIED);
  EXPECT_TRUE(pulled.empty());
  EXPECT_CODE(PullWeights(p.id, "", &pulled), UNAUTHENTICATED);
  EXPECT_TRUE(pulled.empty());

  // The refused pushes changed nothing.
  ASSERT_TRUE(PullWeights(p.id, p.token, &pulled).ok());
  EXPECT_TRUE(pulled == weights);
  EXPECT_TRUE(DeleteSession(p.id, p.token).ok());
}

TEST_F(TokenTest, ListSessionsNeedsTheAdminToken) {
  EXPECT_CODE(ListSessions(""), UNAUTHENTICATED);
  EXPECT_CODE(ListSessions("admin-wrong"), PERMISSION_DENIED);
  EXPECT_CODE(ListSessions(a_.token), PERMISSION_DENIED);  // a session's token is no admin's
  v1::ListSessionsResponse listed;
  ASSERT_TRUE(ListSessions(kAdminToken, "", &listed).ok());
  std::vector<std::string> ids;
  for (const v1::SessionInfo& s : listed.sessions()) ids.push_back(s.session_id());
  EXPECT_THAT(ids, ::testing::IsSupersetOf({a_.id, b_.id}));
  EXPECT_TRUE(ListSessions("", kAdminToken).ok());  // as bearer metadata

  // The client sends its bearer_token as the admin token.
  ClientOptions options;
  options.target = server_->address();
  options.bearer_token = kAdminToken;
  auto admin = Client::Create(options);
  ASSERT_TRUE(admin.ok()) << admin.status();
  EXPECT_TRUE((*admin)->ListSessions().ok()) << (*admin)->ListSessions().status();
  EXPECT_ABSL_CODE(client_->ListSessions().status(), kUnauthenticated);
}

TEST_F(TokenTest, AdminTokenInspectsAndDeletesAnySession) {
  EXPECT_TRUE(GetSession(a_.id, kAdminToken).ok());
  EXPECT_TRUE(GetSession(a_.id, "", kAdminToken).ok());
  EXPECT_CODE(GetSession(a_.id, "admin-wrong"), PERMISSION_DENIED);
  EXPECT_CODE(DeleteSession(a_.id, "admin-wrong"), PERMISSION_DENIED);
  EXPECT_TRUE(GetSession(a_.id, a_.token).ok());
  EXPECT_TRUE(DeleteSession(a_.id, kAdminToken).ok());
  EXPECT_CODE(GetSession(a_.id, a_.token), NOT_FOUND);
  EXPECT_TRUE(DeleteSession(b_.id, "", kAdminToken).ok());
  EXPECT_CODE(GetSession(b_.id, b_.token), NOT_FOUND);

  // The admin token is for inspecting and deleting, not for stepping.
  const SessionHandle c = NewSession(v1::SESSION_MODE_UPDATES);
  SessionHandle as_admin = c;
  as_admin.token = kAdminToken;
  EXPECT_CODE(ClientStep(client_.get(), as_admin, 1, RandomGradients(TinyModel(), 5)).status,
              PERMISSION_DENIED);
  EXPECT_TRUE(DeleteSession(c.id, c.token).ok());
}

TEST(OpenServerTest, WithoutAnAdminTokenListingIsOpenAndTokensStillCount) {
  auto server = ServerProcess::Start();
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  auto client = NewClient(**server);
  ASSERT_NE(client, nullptr);
  absl::StatusOr<SessionHandle> a = client->CreateSession(CreateRequest(TinyModel()));
  ASSERT_TRUE(a.ok()) << a.status();
  absl::StatusOr<std::vector<v1::SessionInfo>> listed = client->ListSessions();
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), 1u);
  // No admin token configured: a guess at one is just a wrong session token.
  grpc::ClientContext ctx;
  v1::GetSessionRequest request;
  request.set_session_id(a->id);
  request.set_token(kAdminToken);
  v1::SessionInfo info;
  EXPECT_CODE(stub->GetSession(&ctx, request, &info), PERMISSION_DENIED);
}

TEST(AdminTokenFlagsTest, BadAdminTokenFlagsStopTheServerWithAReason) {
  char dir[] = "/tmp/muon-admin-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string empty = std::string(dir) + "/empty";
  WriteFile(empty, "\n");
  auto both = ServerProcess::Start({"--admin_token=x", "--admin_token_file=" + empty}, true);
  ASSERT_FALSE(both.ok());
  EXPECT_THAT(both.status().message(), HasSubstr("not both"));
  auto empty_file = ServerProcess::Start({"--admin_token_file=" + empty}, true);
  ASSERT_FALSE(empty_file.ok());
  EXPECT_THAT(empty_file.status().message(), HasSubstr("is empty"));
  auto missing = ServerProcess::Start({"--admin_token_file=" + std::string(dir) + "/absent"}, true);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("cannot read --admin_token_file"));
  std::remove(empty.c_str());
  rmdir(dir);
}

}  // namespace
}  // namespace muon::testing
