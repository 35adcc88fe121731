// The playground's page (src/parallm/playground/web/: HTML, CSS, plain JavaScript), compiled into
// the binary by embed_web.cmake so that nothing is fetched at run time.
#pragma once

#include <string_view>
#include <vector>

namespace parallm::playground {

struct WebAsset {
  std::string_view path;  // "/index.html", "/app.js", "/style.css"
  std::string_view mime;
  std::string_view body;
};

const std::vector<WebAsset>& web_assets();

}  // namespace parallm::playground
