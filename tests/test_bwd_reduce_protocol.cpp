// The reduce kernel's barrier protocol (src/backends/cuda/hopper/bwd: dkdv_item, reduce_item, dq_to_staging,
// dq_reducer, and the K/V ring's loader), as a model run under random interleavings on the CPU. A kernel race
// shows on the GPU only when the timing happens to line up (the single dq_empty barrier passed every GPU test and
// hung one fuzz run in a thousand problems); here every step of two consumer warpgroups, the dQ reducer and the
// loader is scheduled at random, thousands of times, and the model checks what the kernel relies on:
//  - a dQ product reads a dS^T ring buffer only once both halves of *its* block are there, and no half is
//    overwritten before that product has read it;
//  - the staging buffer is written only when the reduction has read the block before, and the reduction reads
//    each block's dQ, in order, exactly once;
//  - a K/V stage is reloaded only after both warpgroups released it, and each holds the block its users expect;
//  - the owned K and V an item's products read are that item's (S^T and every dQ product read the owned K, dP^T the
//    owned V), and neither is reloaded before both warpgroups released it: with one owned buffer each (q_full and
//    q_empty, released after the item's last dQ turn) or with two owned-K slots and the last dQ turn carried into
//    the next item (Owned::carried: k_full / k_empty per slot, the owned V freed after each warpgroup's last dP^T);
//  - each item reads its own row record (the record warp's rows_full / rows_empty: two slots released at the item's
//    end, or with Owned::carried one slot released at its start);
//  - nobody waits forever.
// mbarriers are modelled as the hardware defines them: an expected arrival count, a count of completed phases, and
// a parity wait that returns once the phase of that parity has completed (so a waiter two phases ahead passes).
// The model is of the protocol, not the code: keep it in step with the comments of those functions.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "oracle_case.hpp"

namespace {

struct MBarrier {
  int expected = 1, arrived = 0;
  uint32_t completed = 0;  // phases completed so far
  void arrive() {
    if (++arrived == expected) arrived = 0, ++completed;
  }
  /// mbarrier.try_wait.parity: true once the phase with this parity has completed, i.e. the current phase's parity
  /// differs from it.
  bool ready(uint32_t parity) const { return (completed & 1) != parity; }
};

enum class Protocol {
  two_dq_empty,  // dkdv_item (TILEWISE_HOPPER_BWD_REDUCE_OVERLAP=0)
  one_dq_empty,  // the kernel before the fix
  deferred,      // reduce_item<1>: the dQ product issued before the block's stages are freed, staged after
  ahead,         // reduce_item<2>: and the next block's stages acquired before this block's are freed
};

enum class Owned {
  single,      // one owned K and V buffer, freed (q_empty) after each warpgroup's last dQ turn of the item
  carried,     // two owned-K slots; the item's last dQ turn carried into the next item; V freed after the last dP^T
  carried_early,  // carried, with the K slot released before the carried dQ product (wrong: the model must see it)
};

/// One random interleaving of the protocol over items of the given block counts, with a K/V ring of `stages`
/// stages and the owned blocks fed by a loader; returns "" or what went wrong.
std::string run_once(Protocol protocol, const std::vector<int>& items, std::mt19937_64& rng, int stages = 2,
                     Owned owned = Owned::single) {
  std::array<MBarrier, 2> ds_full, ds_empty, dq_empty;
  MBarrier dq_full;
  for (auto& b : ds_full) b.expected = 2;  // both warpgroups' halves
  std::vector<MBarrier> stage_full(stages), stage_empty(stages);
  for (auto& b : stage_empty) b.expected = 2;  // both warpgroups release a stage
  std::vector<int> stage_block(stages, -1), stage_releases(stages, 2);  // the block each stage holds
  std::array<std::array<int, 2>, 2> ds_half{{{-1, -1}, {-1, -1}}};  // block whose half w each ring buffer holds
  std::array<int, 2> ds_last_read{-1, -1};  // the last block whose dQ product read each ring buffer
  int staged = -1;                           // block whose dQ the staging buffer holds
  bool staged_read = true;
  int total = 0;
  for (int n : items) total += n;
  std::vector<int> item_of(total), last_of_item(items.size());  // each block's item; each item's last block
  for (int i = 0, b = 0; i < static_cast<int>(items.size()); ++i) {
    for (int k = 0; k < items[i]; ++k) item_of[b++] = i;
    last_of_item[i] = items[i] > 0 ? b - 1 : -1;  // (an item of no block: the kernel's item that streams nothing)
  }
  // The owned blocks. owned_slots 1: one K and one V buffer, both freed on q_empty once each warpgroup has done the
  // item's last dQ turn (q_full: the loads). owned_slots 2: K in slot i % 2, freed on k_empty[slot] once each
  // warpgroup has read it for the last time (the item's last block's dQ, carried into the next item, for the one
  // whose turn it is); V freed on v_empty after each warpgroup's last dP^T of the item.
  const bool carried = owned != Owned::single;
  std::array<MBarrier, 2> k_full, k_empty;
  MBarrier v_full, v_empty;
  for (auto& b : k_empty) b.expected = 2;
  v_empty.expected = 2;
  std::array<int, 2> k_item{-1, -1}, k_releases{2, 2};  // the item each K slot holds; releases since its load
  int v_item = -1, v_releases = 2;
  auto k_slot = [&](int i) { return carried ? i & 1 : 0; };
  // The owned rows' records (the producer's record warp): two slots released at the item's end, or with the carried
  // protocol one slot, released as soon as the warpgroups have copied it at the item's start.
  const int record_slots = carried ? 1 : 2;
  std::array<MBarrier, 2> rows_full, rows_empty;
  for (auto& b : rows_empty) b.expected = 2;
  std::array<int, 2> record_item{-1, -1}, record_releases{2, 2};
  auto record_slot = [&](int i) { return i % record_slots; };
  auto record_parity = [&](int i) { return static_cast<uint32_t>((i / record_slots) & 1); };
  auto check_k = [&](int i, const char* what) -> std::string {
    if (k_item[k_slot(i)] != i)
      return std::string(what) + " of item " + std::to_string(i) + " read the owned K of item " +
             std::to_string(k_item[k_slot(i)]);
    return "";
  };

  // Each agent is a list of steps, each a guard (may it run now?) and an action (returns an error or "").
  struct Step {
    std::function<bool()> guard;
    std::function<std::string()> act;
  };
  std::array<std::vector<Step>, 5> agents;  // warpgroup 0, warpgroup 1, the reducer, the K/V loader, the records
  auto always = [] { return true; };
  const bool overlapped = protocol == Protocol::deferred || protocol == Protocol::ahead;

  for (int w = 0; w < 2; ++w) {
    auto& s = agents[w];
    auto ds_read = [&](int m) -> std::string {  // the dQ product of block m reads its ring buffer
      if (ds_half[m & 1][0] != m || ds_half[m & 1][1] != m)
        return "dQ product of block " + std::to_string(m) + " read a dS^T ring buffer holding blocks " +
               std::to_string(ds_half[m & 1][0]) + "/" + std::to_string(ds_half[m & 1][1]);
      return "";
    };
    // The overlapped loops issue the product (it reads the buffer asynchronously from then on) and wait for it
    // later: both ends check the buffer.
    auto issue_dq = [&](int m) {
      s.push_back({[&, m] { return ds_full[m & 1].ready((m >> 1) & 1); }, [&, ds_read, check_k, m] {
                     if (std::string e = check_k(item_of[m], "a dQ product"); !e.empty()) return e;
                     return ds_read(m);
                   }});
    };
    auto stage_dq = [&, w](int m) {
      s.push_back({always, [&, ds_read, check_k, m]() -> std::string {
                     if (std::string e = check_k(item_of[m], "a dQ product"); !e.empty()) return e;
                     if (std::string e = ds_read(m); !e.empty()) return e;
                     ds_last_read[m & 1] = m;
                     ds_empty[m & 1].arrive();
                     return "";
                   }});
      auto free_for_m = [&, m, protocol] {
        if (protocol == Protocol::one_dq_empty) return dq_empty[0].ready((m & 1) ^ 1);
        return m == 0 || dq_empty[(m - 1) & 1].ready(((m - 1) >> 1) & 1);
      };
      s.push_back({free_for_m, [&, m]() -> std::string {
                     if (!staged_read)
                       return "block " + std::to_string(m) + "'s dQ overwrote block " + std::to_string(staged) +
                              "'s before the reduction read it";
                     staged = m, staged_read = false;
                     dq_full.arrive();
                     return "";
                   }});
    };
    auto dq_to_staging = [&](int m) { issue_dq(m), stage_dq(m); };
    auto acquire = [&](int b) {  // wait for block b's K/V stage
      s.push_back({[&, b] { return stage_full[b % stages].ready((b / stages) & 1); }, [&, b]() -> std::string {
                     if (stage_block[b % stages] != b)
                       return "block " + std::to_string(b) + "'s stage holds block " +
                              std::to_string(stage_block[b % stages]);
                     return "";
                   }});
    };
    auto release = [&](int b) {
      s.push_back({always, [&, b]() -> std::string {
                     if (stage_block[b % stages] != b)
                       return "block " + std::to_string(b) + "'s stage was reloaded before its release";
                     ++stage_releases[b % stages];
                     stage_empty[b % stages].arrive();
                     return "";
                   }});
    };
    // This warpgroup's release of item i's owned K (one arrival per item), after its last read of it.
    auto release_k = [&](int i) {
      s.push_back({always, [&, i] {
                     ++k_releases[k_slot(i)];
                     if (carried)
                       k_empty[i & 1].arrive();
                     else
                       k_empty[0].arrive();  // q_empty: K and V together
                     return std::string();
                   }});
    };
    auto release_record = [&](int i) {
      s.push_back({always, [&, i] {
                     ++record_releases[record_slot(i)];
                     rows_empty[record_slot(i)].arrive();
                     return std::string();
                   }});
    };
    int block = 0, pending = -1;
    for (int item = 0; item < static_cast<int>(items.size()); ++item) {
      const int n = items[item];
      if (!carried) pending = -1;
      // The item's row record: written, and this item's.
      s.push_back({[&, item] { return rows_full[record_slot(item)].ready(record_parity(item)); },
                   [&, item]() -> std::string {
                     if (record_item[record_slot(item)] != item)
                       return "item " + std::to_string(item) + " read the row record of item " +
                              std::to_string(record_item[record_slot(item)]);
                     return "";
                   }});
      if (carried) release_record(item);
      // The item's owned blocks: loaded, and the right ones.
      s.push_back({[&, item] {
                     return carried ? k_full[item & 1].ready((item >> 1) & 1) && v_full.ready(item & 1)
                                    : k_full[0].ready(item & 1);
                   },
                   [&, item, check_k]() -> std::string {
                     if (std::string e = check_k(item, "S^T"); !e.empty()) return e;
                     if (v_item != item)
                       return "dP^T of item " + std::to_string(item) + " read the owned V of item " +
                              std::to_string(v_item);
                     return "";
                   }});
      if (n == 0) {  // an item that streams nothing: the carried dQ and both owned buffers are settled here
        if (carried && pending >= 0 && pending % 2 == w) {
          dq_to_staging(pending);
          if (owned == Owned::carried) release_k(item_of[pending]);
        }
        if (carried) {
          pending = -1;
          s.push_back({always, [&] {
                         ++v_releases;
                         v_empty.arrive();
                         return std::string();
                       }});
        }
        release_k(item);
        if (!carried) release_record(item);
        continue;
      }
      for (int i = 0; i < n; ++i, ++block) {
        const int b = block;
        if (protocol != Protocol::ahead || i == 0) acquire(b);
        s.push_back({always, [&, item, check_k]() -> std::string {  // S^T and dP^T of block b
                       if (std::string e = check_k(item, "S^T"); !e.empty()) return e;
                       if (v_item != item)
                         return "dP^T of item " + std::to_string(item) + " read the owned V of item " +
                                std::to_string(v_item);
                       return "";
                     }});
        if (carried && i == n - 1)  // the item's last dP^T has completed: the owned V is free
          s.push_back({always, [&] {
                         ++v_releases;
                         v_empty.arrive();
                         return std::string();
                       }});
        s.push_back({[&, b] { return ds_empty[b & 1].ready(((b >> 1) & 1) ^ 1); }, [&, b, w]() -> std::string {
                       if (b >= 2 && ds_last_read[b & 1] != b - 2)
                         return "block " + std::to_string(b) + " overwrote block " + std::to_string(b - 2) +
                                "'s dS^T before its dQ product read it";
                       ds_half[b & 1][w] = b;
                       return "";
                     }});
        s.push_back({always, [&, b] { ds_full[b & 1].arrive(); return std::string(); }});
        const bool turn = pending >= 0 && pending % 2 == w;
        if (overlapped) {
          if (turn) issue_dq(pending);
          if (protocol == Protocol::ahead && i + 1 < n) acquire(b + 1);
          release(b);
          if (turn) stage_dq(pending);
        } else {
          release(b);
          if (turn) dq_to_staging(pending);
        }
        // carried: the owned K of pending's item is read for the last time by this warpgroup when pending is that
        // item's last block and this is its turn (the carried dQ), or, for the other warpgroup, in the item's own last
        // block (its S^T, and the turn before, which this loop has just done).
        if (owned == Owned::carried && turn && pending == last_of_item[item_of[pending]] && item_of[pending] != item)
          release_k(item_of[pending]);
        if (carried && i == n - 1 && (b % 2 != w || owned == Owned::carried_early)) release_k(item);
        pending = b;
      }
      if (!carried) {
        if (pending >= 0 && pending % 2 == w) dq_to_staging(pending);
        release_k(item);  // q_empty
        release_record(item);  // after the stores, which read the positions (copied into registers)
      }
    }
    if (carried && pending >= 0 && pending % 2 == w) {  // the last item's last dQ, after every item
      dq_to_staging(pending);
      if (owned == Owned::carried) release_k(item_of[pending]);
    }
  }
  // The loader: per item its owned blocks (waiting for their buffers), then the item's blocks, each into a stage once
  // both warpgroups released it.
  auto load_owned = [&](int i) {
    const int slot = k_slot(i);
    const uint32_t k_phase = carried ? ((i >> 1) & 1) ^ 1 : (i & 1) ^ 1;
    agents[3].push_back({[&, slot, k_phase] { return k_empty[slot].ready(k_phase); }, [&, i, slot]() -> std::string {
                           if (k_releases[slot] != 2)
                             return "item " + std::to_string(i) + "'s owned K was loaded over item " +
                                    std::to_string(k_item[slot]) + "'s before both warpgroups released it";
                           k_item[slot] = i, k_releases[slot] = 0;
                           if (!carried) {  // q_empty covers V too
                             v_item = i;
                             k_full[0].arrive();
                           } else {
                             k_full[slot].arrive();
                           }
                           return "";
                         }});
    if (carried)
      agents[3].push_back({[&, i] { return v_empty.ready((i & 1) ^ 1); }, [&, i]() -> std::string {
                             if (v_releases != 2)
                               return "item " + std::to_string(i) + "'s owned V was loaded over item " +
                                      std::to_string(v_item) + "'s before both warpgroups released it";
                             v_item = i, v_releases = 0;
                             v_full.arrive();
                             return "";
                           }});
  };
  std::vector<int> first_of_item(items.size() + 1, 0);
  for (size_t i = 0; i < items.size(); ++i) first_of_item[i + 1] = first_of_item[i] + items[i];
  for (int b = 0, i = 0; b < total || i < static_cast<int>(items.size()); ++b) {
    while (i < static_cast<int>(items.size()) && first_of_item[i] == b) load_owned(i++);  // (items of no block too)
    if (b >= total) break;
    agents[3].push_back({[&, b] { return stage_empty[b % stages].ready(((b / stages) & 1) ^ 1); },
                         [&, b]() -> std::string {
                           if (stage_releases[b % stages] != 2)
                             return "block " + std::to_string(b) + " was loaded over a stage not yet released";
                           stage_block[b % stages] = b, stage_releases[b % stages] = 0;
                           stage_full[b % stages].arrive();
                           return "";
                         }});
  }
  for (int m = 0; m < total; ++m) {
    agents[2].push_back({[&, m] { return dq_full.ready(m & 1); }, [&, m]() -> std::string {
                           if (staged != m || staged_read)
                             return "the reduction of block " + std::to_string(m) + " found block " +
                                    std::to_string(staged) + (staged_read ? " (already read)" : "");
                           staged_read = true;
                           return "";
                         }});
    agents[2].push_back({always, [&, m, protocol] {
                           dq_empty[protocol == Protocol::one_dq_empty ? 0 : m & 1].arrive();
                           return std::string();
                         }});
  }

  for (int i = 0; i < static_cast<int>(items.size()); ++i) {  // the record warp: a slot once both released it
    agents[4].push_back({[&, i] { return rows_empty[record_slot(i)].ready(record_parity(i) ^ 1); },
                         [&, i]() -> std::string {
                           const int slot = record_slot(i);
                           if (record_releases[slot] != 2)
                             return "item " + std::to_string(i) + "'s row record overwrote item " +
                                    std::to_string(record_item[slot]) + "'s before both warpgroups released it";
                           record_item[slot] = i, record_releases[slot] = 0;
                           rows_full[slot].arrive();
                           return "";
                         }});
  }

  std::array<size_t, 5> next{0, 0, 0, 0, 0};
  for (;;) {
    std::vector<int> runnable;
    for (int a = 0; a < 5; ++a)
      if (next[a] < agents[a].size() && agents[a][next[a]].guard()) runnable.push_back(a);
    if (runnable.empty()) break;
    const int a = runnable[std::uniform_int_distribution<size_t>(0, runnable.size() - 1)(rng)];
    if (std::string e = agents[a][next[a]++].act(); !e.empty()) return e;
  }
  for (int a = 0; a < 5; ++a)
    if (next[a] < agents[a].size())
      return std::string(a == 4   ? "the record warp"
                         : a == 3 ? "the loader"
                         : a == 2 ? "the reducer"
                                  : "warpgroup " + std::to_string(a)) +
             " waits forever (step " +
             std::to_string(next[a]) + " of " + std::to_string(agents[a].size()) + ")";
  return "";
}

class ReduceKernelProtocol : public ::testing::Test {
 protected:
  const uint64_t seed = oracle::fresh_seed();
  std::mt19937_64 rng{seed};
  ::testing::ScopedTrace trace{__FILE__, __LINE__, oracle::seed_note(seed)};

  /// Random item lists: 1-4 items of 1-7 blocks (odd and even counts, so the turns cross item boundaries), and with
  /// `empty_items` some of no block (an item whose only streamed record is empty).
  std::vector<int> random_items(bool empty_items = false) {
    std::vector<int> items(std::uniform_int_distribution<int>(1, 4)(rng));
    for (int& n : items) n = std::uniform_int_distribution<int>(empty_items ? 0 : 1, 7)(rng);
    return items;
  }
};

TEST_F(ReduceKernelProtocol, EveryInterleavingKeepsTheBuffersConsistentAndEnds) {
  for (Protocol protocol : {Protocol::two_dq_empty, Protocol::deferred, Protocol::ahead})
    for (int stages : {2, 4})
      for (int run = 0; run < 1500; ++run) {
        const std::vector<int> items = random_items(run % 2 == 1);
        const std::string error = run_once(protocol, items, rng, stages);
        ASSERT_EQ(error, "") << "protocol " << static_cast<int>(protocol) << ", " << stages << " stages, run " << run
                             << ", " << items.size() << " items";
      }
}

TEST_F(ReduceKernelProtocol, CarriedLastDqTurnWithTwoOwnedKSlotsKeepsEveryBufferConsistent) {
  // The proposed item boundary (docs/performance.md backward v3.27): item n+1's owned K loaded into the other slot
  // while item n runs, the owned V reloaded once both warpgroups' last dP^T is done, item n's last dQ carried into
  // item n+1's first block.
  for (Protocol protocol : {Protocol::two_dq_empty, Protocol::deferred, Protocol::ahead})
    for (int stages : {2, 4})
      for (int run = 0; run < 1500; ++run) {
        const std::vector<int> items = random_items(true);
        const std::string error = run_once(protocol, items, rng, stages, Owned::carried);
        ASSERT_EQ(error, "") << "protocol " << static_cast<int>(protocol) << ", " << stages << " stages, run " << run
                             << ", " << items.size() << " items";
      }
}

TEST_F(ReduceKernelProtocol, TheModelFindsAnOwnedKSlotReleasedBeforeTheCarriedDq) {
  int failures = 0;
  for (int run = 0; run < 3000 && failures == 0; ++run)
    failures += !run_once(Protocol::two_dq_empty, {3, 1, 2, 1}, rng, 2, Owned::carried_early).empty();
  EXPECT_GT(failures, 0) << "3000 interleavings of the early release found nothing";
}

TEST_F(ReduceKernelProtocol, TheModelFindsTheSingleBarrierRace) {
  // The protocol before the fix: one dq_empty barrier waited with parity (m & 1) ^ 1. The model must catch it,
  // or it could not catch the next race either.
  int failures = 0;
  for (int run = 0; run < 3000 && failures == 0; ++run)
    failures += !run_once(Protocol::one_dq_empty, {7, 5}, rng).empty();
  EXPECT_GT(failures, 0) << "3000 interleavings of the one-barrier protocol found nothing";
}

}  // namespace
