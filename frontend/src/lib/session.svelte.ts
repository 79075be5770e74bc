// Where the app stands (phase, facility, signed-in staff member), shared by the shell and screens.

import { commands, unwrap, type AppStatus, type Staff } from './api';

const state = $state<{ status: AppStatus | null }>({ status: null });

/** The app's status as last reported by the engine (reactive). */
export const session = {
  /** The last `appStatus()` (null before the first answer). */
  get status(): AppStatus | null {
    return state.status;
  },
  /** The signed-in staff member, if any. */
  get staff(): Staff | null {
    return state.status?.staff ?? null;
  },
  /** This facility's role in the deployment (null before joining). */
  get role(): AppStatus['facility_role'] {
    return state.status?.facility_role ?? null;
  },
  /** This facility's name (null while locked). */
  get facilityName(): string | null {
    return state.status?.facility_name ?? null;
  },
};

/** Records a status a command returned (`createFacility`, `unlock`, `join`). */
export function setStatus(s: AppStatus) {
  state.status = s;
}

/** Asks the engine where the app stands and records it. Throws an `AppFailure`. */
export async function refreshStatus(): Promise<AppStatus> {
  const s = await unwrap(commands.appStatus());
  state.status = s;
  return s;
}
