// Generates from token ids with a medusa_rt model directory, streaming tokens as they are
// decoded, then prints the statistics.
//
//   medusa_generate MODEL_DIR TOKEN [TOKEN ...] [--max-new-tokens N] [--tree NAME] [--no-medusa]
//                   [--dtype fp32|bf16|fp16] [--max-seq-len N]
//                   [--temperature T [--top-k K] [--top-p P] [--seed S]]
//
// --temperature T > 0 samples (GenerationConfig::do_sample); greedy otherwise.
// Tokenization stays with the caller (the Python package has the tokenizer). The last line
// printed is "tokens: <id> <id> ...", the whole generation.
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "medusa_rt/engine.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0]
              << " MODEL_DIR TOKEN [TOKEN ...] [--max-new-tokens N] [--tree NAME] [--no-medusa] [--dtype D]\n";
    return 2;
  }
  try {
    medusa_rt::check_version();
    medusa_rt::EngineOptions options;
    medusa_rt::GenerationConfig config;
    config.max_new_tokens = 32;
    std::vector<int32_t> prompt;
    for (int i = 2; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw medusa_rt::InvalidArgumentError(a + " needs a value");
        return argv[++i];
      };
      if (a == "--max-new-tokens") config.max_new_tokens = std::stoi(value());
      else if (a == "--tree") options.tree = value();
      else if (a == "--dtype") options.dtype = value();
      else if (a == "--max-seq-len") options.max_seq_len = std::stoi(value());
      else if (a == "--no-medusa") config.medusa = false;
      else if (a == "--temperature") {
        config.temperature = std::stof(value());
        config.do_sample = config.temperature > 0;
      } else if (a == "--top-k") config.top_k = std::stoi(value());
      else if (a == "--top-p") config.top_p = std::stof(value());
      else if (a == "--seed") config.seed = std::stoll(value());
      else prompt.push_back(static_cast<int32_t>(std::stol(a)));
    }

    medusa_rt::Engine engine(argv[1], options);
    const medusa_rt::ModelInfo& info = engine.info();
    std::cerr << "medusa_rt " << medusa_rt::version() << ": " << info.architecture << ", " << info.num_layers
              << " layers, " << info.dtype << " weights, kernels " << info.isa << ", Medusa heads "
              << info.medusa_heads << ", tree " << info.tree << " (" << info.tree_nodes << " nodes)\n";

    medusa_rt::Session session = engine.session();
    std::cout << "stream:";
    auto on_tokens = [](const std::vector<int32_t>& tokens) {
      for (int32_t t : tokens) std::cout << ' ' << t;
      std::cout.flush();
      return true;  // false would cancel
    };
    medusa_rt::GenerationResult r = session.generate(prompt, config, on_tokens);
    std::cout << "\n";
    const medusa_rt::GenerationStats& s = r.stats;
    std::cerr << s.new_tokens << " tokens in " << s.total_seconds << " s (" << s.tokens_per_second
              << " tokens/s), " << s.steps << " steps, " << s.tokens_per_step << " tokens/step, finish "
              << medusa_rt::to_string(r.finish_reason) << "\n";
    std::cout << "tokens:";
    for (int32_t t : r.tokens) std::cout << ' ' << t;
    std::cout << "\n";
    return 0;
  } catch (const medusa_rt::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
