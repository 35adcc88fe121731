#include "parallm/model/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_map>

#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kComponent = "safetensors";
// The same cap as the reference implementation: a larger header is a corrupt length field.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// An index lists one line per tensor: a larger one is not an index.
constexpr uint64_t kMaxIndexBytes = 100'000'000;

// Every dtype of the safetensors spec with its size; only F32/BF16/F16 are readable.
size_t st_dtype_size(const std::string& s) {
  static const std::unordered_map<std::string, size_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  auto it = kSizes.find(s);
  return it == kSizes.end() ? 0 : it->second;
}

std::optional<DType> st_readable(const std::string& s) {
  if (s == "F32") return DType::F32;
  if (s == "BF16") return DType::BF16;
  if (s == "F16") return DType::F16;
  return std::nullopt;
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A non-negative JSON integer as uint64, or an error naming the field.
// `field` is the path below the tensor, e.g. "shape[1]"; the value is shown as a short preview.
uint64_t get_count(const json& v, const std::string& source, const std::string& name,
                   const std::string& field) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0)
    return static_cast<uint64_t>(v.get<int64_t>());
  fail(kComponent, source, ": tensors[\"", name, "\"].", field,
       " must be a non-negative integer, got ", json_preview(v));
}

MappedTensor parse_entry(const std::string& name, const json& e, uint64_t data_size,
                         size_t data_start, const std::string& source) {
  if (!e.is_object())
    fail(kComponent, source, ": tensors[\"", name, "\"] must be an object, got ", json_preview(e));
  MappedTensor t;
  t.name = name;

  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string())
    fail(kComponent, source, ": tensor \"", name, "\" has no \"dtype\" string");
  t.dtype_name = dt->get<std::string>();
  const size_t es = st_dtype_size(t.dtype_name);
  if (es == 0)
    fail(kComponent, source, ": tensor \"", name, "\" has unknown dtype \"", t.dtype_name,
         "\" (parallm reads F32, BF16, F16)");
  t.dtype = st_readable(t.dtype_name);

  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array())
    fail(kComponent, source, ": tensor \"", name, "\" has no \"shape\" array");
  uint64_t numel = 1;
  bool overflow = false;
  for (size_t i = 0; i < sh->size(); ++i) {
    const uint64_t n = get_count((*sh)[i], source, name, cat("shape[", i, "]"));
    if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(kComponent, source, ": tensors[\"", name, "\"].shape[", i, "] = ", n, " is too large");
    t.shape.push_back(static_cast<int64_t>(n));
    overflow = overflow || __builtin_mul_overflow(numel, n, &numel);
  }
  uint64_t nbytes = 0;
  if (overflow || __builtin_mul_overflow(numel, static_cast<uint64_t>(es), &nbytes))
    fail(kComponent, source, ": tensors[\"", name, "\"].shape ", shape_str(t.shape),
         " is too large (its byte count overflows)");

  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2)
    fail(kComponent, source, ": tensor \"", name, "\" needs \"data_offsets\": [begin, end], got ",
         off == e.end() ? std::string("nothing") : json_preview(*off));
  const uint64_t begin = get_count((*off)[0], source, name, "data_offsets[0]");
  const uint64_t end = get_count((*off)[1], source, name, "data_offsets[1]");
  if (begin > end)
    fail(kComponent, source, ": tensor \"", name, "\" begins at byte ", begin,
         " after it ends at byte ", end);
  if (end > data_size)
    fail(kComponent, source, ": tensor \"", name, "\" ends at byte ", end, " but the file has ",
         data_size, " bytes of data (", data_start + data_size, " bytes in all, ", data_start,
         " of header)");
  if (end - begin != nbytes)
    fail(kComponent, source, ": tensor \"", name, "\" has data_offsets [", begin, ", ", end, "] (",
         end - begin, " bytes) but ", t.dtype_name, " ", shape_str(t.shape), " needs ", nbytes,
         " bytes");
  t.begin = data_start + begin;
  t.end = data_start + end;
  return t;
}

// The format requires the tensors to cover the data section exactly: sorted by offset, the first
// begins at 0, each begins where the one before ends, and the last ends at the end of the file.
// A gap or a tail of unclaimed bytes means the header length or an offset is wrong (a header a few
// bytes short still parses thanks to the space padding, and would read every tensor shifted).
void check_coverage(const std::vector<MappedTensor>& tensors, size_t data_start, uint64_t data_size,
                    const std::string& source) {
  std::vector<const MappedTensor*> order;
  for (const MappedTensor& t : tensors)
    if (t.end > t.begin) order.push_back(&t);  // empty tensors occupy no bytes
  std::sort(order.begin(), order.end(),
            [](const MappedTensor* a, const MappedTensor* b) { return a->begin < b->begin; });
  uint64_t covered = 0;  // bytes [0, covered) of the data section are claimed
  const MappedTensor* prev = nullptr;
  for (const MappedTensor* t : order) {
    const uint64_t b = t->begin - data_start, e = t->end - data_start;
    if (b < covered)
      fail(kComponent, source, ": tensors \"", prev->name, "\" (bytes [", prev->begin - data_start,
           ", ", covered, ")) and \"", t->name, "\" (bytes [", b, ", ", e, ")) overlap");
    if (b > covered)
      fail(kComponent, source, ": bytes [", covered, ", ", b,
           ") of the data section belong to no tensor (before \"", t->name,
           "\"); the header length or data_offsets are wrong");
    covered = e;
    prev = t;
  }
  if (covered != data_size)
    fail(kComponent, source, ": the tensors end at byte ", covered,
         " of the data section but it has ", data_size, " bytes (", data_start,
         " of header before it); the header length or "
         "data_offsets are wrong");
}

std::shared_ptr<const MappedFile> map_file(const std::string& path) {
  return std::make_shared<const MappedFile>(path);
}

std::unique_ptr<WeightSource> open_single(const std::string& path, const std::string& description) {
  auto file = map_file(path);
  SafetensorsHeader h = parse_safetensors_header(file->data(), file->size(), path);
  // The header is parsed into our own structures: its pages need not stay resident.
  file->release(0, h.data_start);
  return std::make_unique<MappedTensorSource>(kComponent, description,
                                              std::vector<std::shared_ptr<const MappedFile>>{file},
                                              std::move(h.tensors));
}

std::unique_ptr<WeightSource> open_index(const std::string& index_path,
                                         const std::string& description) {
  const std::vector<std::pair<std::string, std::string>> weight_map = parse_safetensors_index(
      read_text_file(index_path, kMaxIndexBytes, kComponent), index_path);

  const fs::path dir = fs::path(index_path).parent_path();
  std::vector<std::shared_ptr<const MappedFile>> files;
  std::vector<SafetensorsHeader> headers;
  std::map<std::string, size_t> shard_index;           // shard file name -> index into files
  std::unordered_map<std::string, size_t> shard_of;    // tensor -> index into files
  std::vector<std::pair<std::string, size_t>> wanted;  // (tensor, shard), in index order
  for (const auto& [tensor, shard] : weight_map) {
    auto [pos, inserted] = shard_index.emplace(shard, files.size());
    if (inserted) {
      const std::string shard_path = (dir / shard).string();
      std::error_code ec;
      if (!fs::is_regular_file(shard_path, ec))
        fail(kComponent, index_path, ": shard \"", shard, "\" (holding tensor \"", tensor,
             "\") does not exist: no file ", shard_path);
      files.push_back(map_file(shard_path));
      headers.push_back(
          parse_safetensors_header(files.back()->data(), files.back()->size(), shard_path));
      files.back()->release(0, headers.back().data_start);
    }
    wanted.emplace_back(tensor, pos->second);
    shard_of.emplace(tensor, pos->second);
  }

  std::vector<MappedTensor> tensors;
  std::set<std::string> taken;
  for (const auto& want : wanted) {
    // Not a structured binding: clang (the fuzz build) does not let a lambda capture one.
    const std::string& name = want.first;
    const size_t shard = want.second;
    const auto& ts = headers[shard].tensors;
    auto found =
        std::find_if(ts.begin(), ts.end(), [&](const MappedTensor& t) { return t.name == name; });
    if (found == ts.end())
      fail(kComponent, index_path, ": the index puts tensor \"", name, "\" in ",
           files[shard]->path(), ", which has no such tensor");
    tensors.push_back(*found);
    tensors.back().file = shard;
    taken.insert(name);
  }
  // Tensors a shard holds that the index forgot are still readable, unless two shards hold one.
  for (size_t s = 0; s < headers.size(); ++s) {
    for (const MappedTensor& t : headers[s].tensors) {
      auto it = shard_of.find(t.name);
      if (it != shard_of.end() && it->second == s) continue;
      if (!taken.insert(t.name).second)
        fail(kComponent, index_path, ": tensor \"", t.name, "\" is in more than one shard (",
             files[s]->path(), " is one)");
      tensors.push_back(t);
      tensors.back().file = s;
    }
  }
  return std::make_unique<MappedTensorSource>(kComponent, description, std::move(files),
                                              std::move(tensors));
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Removes the temporary file unless the write committed it.
struct TempFile {
  std::string path;
  std::FILE* f = nullptr;
  bool committed = false;
  ~TempFile() {
    if (f) std::fclose(f);
    if (!committed) std::remove(path.c_str());
  }
};

}  // namespace

const char* safetensors_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "F32";
    case DType::BF16:
      return "BF16";
    case DType::F16:
      return "F16";
    case DType::I32:
      return "I32";
    case DType::I64:
      return "I64";
    case DType::U8:
      return "U8";
    case DType::Q8_0:
    case DType::Q4_0:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
      break;  // no safetensors dtype: block-quantized weights are written as GGUF
  }
  return "?";
}

SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, size_t size,
                                           const std::string& source) {
  if (size < 8)
    fail(kComponent, source, ": the file has ", size,
         " bytes, too few for the 8-byte header length");
  const uint64_t n = read_le64(bytes);
  if (n > size - 8)
    fail(kComponent, source, ": the header length ", n, " runs past the end of the file (", size,
         " bytes, so at most ", size - 8, ")");
  if (n > kMaxHeaderBytes)
    fail(kComponent, source, ": the header length ", n, " is over the ", kMaxHeaderBytes,
         "-byte limit");
  SafetensorsHeader h;
  h.data_start = 8 + static_cast<size_t>(n);
  const uint64_t data_size = size - h.data_start;

  const std::string_view text(reinterpret_cast<const char*>(bytes + 8), static_cast<size_t>(n));
  check_json_depth(text, kMaxJsonDepth, kComponent, source);
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    fail(kComponent, source, ": the ", n, "-byte header is not valid JSON: ", e.what());
  }
  if (!j.is_object())
    fail(kComponent, source, ": the header must be a JSON object, got a ", j.type_name());

  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object())
        fail(kComponent, source, ": __metadata__ must be an object, got ", json_preview(*it));
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          fail(kComponent, source, ": __metadata__[\"", m.key(), "\"] must be a string, got ",
               json_preview(*m));
        h.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    h.tensors.push_back(parse_entry(it.key(), *it, data_size, h.data_start, source));
  }
  check_coverage(h.tensors, h.data_start, data_size, source);
  return h;
}

bool looks_like_safetensors(const std::string& path) {
  // Never blocks: a FIFO or device is not safetensors (and is refused by name when opened).
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  std::ifstream in(path, std::ios::binary);
  uint8_t head[9];
  if (!in.read(reinterpret_cast<char*>(head), sizeof(head))) return false;
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint64_t n = read_le64(head);
  return n >= 2 && n <= size - 8 && n <= kMaxHeaderBytes && head[8] == '{';
}

std::map<std::string, std::string> read_safetensors_metadata(const std::string& path) {
  MappedFile file(path);
  return parse_safetensors_header(file.data(), file.size(), path).metadata;
}

std::unique_ptr<WeightSource> open_safetensors(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) fail(kComponent, path, ": no such file or directory");
  if (fs::is_directory(st)) {
    const fs::path dir(path);
    if (fs::is_regular_file(dir / kSafetensorsIndexFile, ec))
      return open_index((dir / kSafetensorsIndexFile).string(), path);
    if (fs::is_regular_file(dir / kSafetensorsFile, ec))
      return open_single((dir / kSafetensorsFile).string(), path);
    fail(kComponent, path, ": the directory holds neither ", kSafetensorsFile, " nor ",
         kSafetensorsIndexFile);
  }
  if (ends_with(path, ".json")) return open_index(path, path);
  return open_single(path, path);
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // The header keeps the caller's order, so the data section does too.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  std::vector<Tensor> data;
  data.reserve(tensors.size());
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name.empty() || name == "__metadata__")
      fail(kComponent, path, ": cannot write a tensor named \"", name, "\"");
    if (header.contains(name)) fail(kComponent, path, ": tensor \"", name, "\" is given twice");
    if (!tensor.defined()) fail(kComponent, path, ": tensor \"", name, "\" is undefined");
    if (is_block(tensor.dtype()))
      fail(kComponent, path, ": tensor \"", name, "\" is ", dtype_name(tensor.dtype()),
           ", which safetensors cannot hold (write a GGUF: parallm quantize)");
    data.push_back(tensor.is_contiguous() ? tensor : tensor.contiguous());
    const uint64_t nbytes = data.back().nbytes();
    header[name] = {{"dtype", safetensors_dtype_name(tensor.dtype())},
                    {"shape", tensor.shape()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  // Padding with spaces to a multiple of 8 keeps the data section 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i)
    len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));

  static std::atomic<uint64_t> counter{0};
  TempFile tmp;
  tmp.path = cat(path, ".tmp.", ::getpid(), ".", counter.fetch_add(1));
  tmp.f = std::fopen(tmp.path.c_str(), "wb");
  if (!tmp.f)
    fail<std::runtime_error>(kComponent, path, ": cannot create ", tmp.path, ": ",
                             std::strerror(errno));
  auto put = [&](const void* p, size_t n) {
    if (n != 0 && std::fwrite(p, 1, n, tmp.f) != n)
      fail<std::runtime_error>(kComponent, path, ": write failed: ", std::strerror(errno));
  };
  put(len, 8);
  put(text.data(), text.size());
  for (const Tensor& t : data) put(t.raw(), t.nbytes());
  const int rc = std::fclose(tmp.f);
  tmp.f = nullptr;
  if (rc != 0) fail<std::runtime_error>(kComponent, path, ": write failed: ", std::strerror(errno));
  if (std::rename(tmp.path.c_str(), path.c_str()) != 0)
    fail<std::runtime_error>(kComponent, path, ": cannot rename ", tmp.path,
                             " to it: ", std::strerror(errno));
  tmp.committed = true;
}

std::vector<std::pair<std::string, std::string>> parse_safetensors_index(std::string_view text,
                                                                      const std::string& source) {
  const json j = parse_json_text(text, kComponent, source);
  if (!j.is_object()) fail(kComponent, source, ": expected a JSON object");
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object())
    fail(kComponent, source, ": missing the \"weight_map\" object (tensor name -> shard file)");
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(wm->size());
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string())
      fail(kComponent, source, ": weight_map[\"", it.key(), "\"] must be a file name, got ",
           json_preview(*it));
    out.emplace_back(it.key(), it->get<std::string>());
  }
  return out;
}

}  // namespace parallm
