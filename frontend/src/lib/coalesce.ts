// Reading the engine again when it says something changed. `DocumentChanged` events come in bursts
// (a sync brings many bundles at once), and a read already on its way may have started before the
// latest change: such a read is run once more afterwards, never several times side by side.
//
//   const reload = coalesced(async () => { letters = await unwrap(commands.referralList()); });
//   $effect(() => onEvent(events.documentChanged, (d) => { if (d.kind === 'referral') reload(); }));

/**
 * `load` made safe to call at any time: a call while it runs makes it run once more when it is done
 * (however many calls came meanwhile), so the last round reads the latest state. Every caller's
 * promise settles when that last round has finished; a round that throws ends the run and rejects.
 */
export function coalesced(load: () => Promise<void>): () => Promise<void> {
  let running: Promise<void> | null = null;
  let again = false;
  return () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          await load();
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
}
