// The care plan commands of the engine (generated `commands.careplan*`), as this screen uses them:
// the one place that knows their argument shapes. Every function throws an `AppFailure`.

import {
  commands,
  unwrap,
  type FacilityChoice,
  type ItemKind,
  type MemberRole,
  type NewGoal,
  type NewLogEntry,
  type NewService,
  type PlacementInput,
  type PlanField,
  type PlanMember,
  type PlanSummary,
  type PlanView,
  type Sheet1,
  type Weekday,
} from '$lib/api';

/** The roles a facility can be given in a plan (there is one owner, the office that made it). */
export type ShareRole = Exclude<MemberRole, 'owner'>;

/** Plans this facility can read, oldest first. */
export function listPlans(): Promise<PlanSummary[]> {
  return unwrap(commands.careplanList());
}

/** One plan, or (with `version`) one recorded version as it was then. */
export function getPlan(id: string, version: number | null = null): Promise<PlanView> {
  return unwrap(commands.careplanGet(id, version));
}

/** Creates a plan from 第1表 and returns its id; `shareWith` makes a facility a member at once. */
export function createPlan(
  sheet1: Sheet1,
  shareWith: { facility: string; role: ShareRole } | null,
): Promise<string> {
  return unwrap(commands.careplanCreate(sheet1, shareWith));
}

/** The member facilities of a plan, owner first. */
export function members(id: string): Promise<PlanMember[]> {
  return unwrap(commands.careplanMembers(id));
}

/** The facilities a plan may be shared with: the others of the directory, except HQs and shelters. */
export async function shareTargets(): Promise<FacilityChoice[]> {
  const all = await unwrap(commands.facilities());
  return all.filter((f) => !f.is_self && f.role !== 'hq' && f.role !== 'shelter');
}

/** Shares the plan with `facility` as `role`, or removes it (`role` null). Owner only. */
export async function share(id: string, facility: string, role: ShareRole | null): Promise<void> {
  await unwrap(commands.careplanShare(id, facility, role));
}

/** Sets a field of 第1表. */
export async function editField(id: string, field: PlanField, value: string): Promise<void> {
  await unwrap(commands.careplanEdit(id, field, value));
}

/** Records the resident's consent (説明・同意日 and who consented). */
export async function consent(id: string, date: string, by: string): Promise<void> {
  await unwrap(commands.careplanConsent(id, date, by));
}

/** Adds a need (課題); returns its id. */
export function addNeed(id: string, text: string, placement: PlacementInput): Promise<string> {
  return unwrap(commands.careplanAddNeed(id, text, placement));
}

/** Adds a goal under a need (長期目標) or a long-term goal (短期目標); returns its id and kind. */
export function addGoal(
  id: string,
  parent: string,
  text: string,
  period: string,
  placement: PlacementInput,
): Promise<NewGoal> {
  return unwrap(commands.careplanAddGoal(id, parent, text, period, placement));
}

/** Adds a service row under a short-term goal; returns its id. */
export function addService(
  id: string,
  goal: string,
  service: NewService,
  placement: PlacementInput,
): Promise<string> {
  return unwrap(commands.careplanAddService(id, goal, service, placement));
}

/** Sets a field of an item of 第2表 or 第3表. */
export async function editItem(id: string, item: string, key: string, value: string): Promise<void> {
  await unwrap(commands.careplanEditItem(id, item, key, value));
}

/**
 * A field's `save` for `key` of an item of 第2表 or 第3表: sends the edit, then records the value in
 * `item` (the plan held here has it too, so the other tabs show it before the next reload).
 */
export function itemSaver(id: string, item: { id: string }, key: string): (value: string) => Promise<void> {
  return async (value) => {
    await editItem(id, item.id, key, value);
    (item as unknown as Record<string, unknown>)[key] = value;
  };
}

/** Moves an item of 第2表 among its siblings. */
export async function moveItem(id: string, item: string, placement: PlacementInput): Promise<void> {
  await unwrap(commands.careplanMoveItem(id, item, placement));
}

/** Removes an item with everything under it. */
export function removeItem(id: string, item: string): Promise<ItemKind> {
  return unwrap(commands.careplanRemoveItem(id, item));
}

/** Adds a service to the weekly grid (第3表); returns its id. */
export function schedule(id: string, day: Weekday, start: string, end: string, service: string): Promise<string> {
  return unwrap(commands.careplanSchedule(id, day, start, end, service));
}

/** Adds an activity to 主な日常生活上の活動; returns its id. */
export function addActivity(id: string, start: string, end: string, text: string): Promise<string> {
  return unwrap(commands.careplanAddActivity(id, start, end, text));
}

/** Sets 週単位以外のサービス. */
export async function setNonWeekly(id: string, text: string): Promise<void> {
  await unwrap(commands.careplanSetNonWeekly(id, text));
}

/** Appends a 支援経過 entry, attributed to the signed-in staff member by the engine; returns its id. */
export function addLog(id: string, entry: NewLogEntry): Promise<string> {
  return unwrap(commands.careplanLog(id, entry));
}

/** Appends a monitoring entry (optionally about one goal), by the signed-in staff member; returns its id. */
export function addMonitoring(id: string, date: string, goal: string | null, text: string): Promise<string> {
  return unwrap(commands.careplanMonitor(id, date, goal, text));
}

/** Appends a comment (optionally about one item), by the signed-in staff member; returns its id. */
export function addComment(id: string, about: string | null, text: string): Promise<string> {
  return unwrap(commands.careplanComment(id, about, text));
}

/** Records the plan as it stands as a new version; returns its number. */
export function recordVersion(id: string, note: string): Promise<number> {
  return unwrap(commands.careplanRecordVersion(id, note));
}

/** Writes 第1表〜第3表 as a PDF in the forms' layout to `path`. */
export async function exportPdf(id: string, version: number | null, path: string): Promise<void> {
  await unwrap(commands.careplanExportPdf(id, path, version));
}

/**
 * Writes the ケアプランデータ連携 CSV files (第1表, 第2表, 第3表, 利用者補足情報) into `dir`; returns the
 * paths written. The provider they are addressed to is left unknown (`0000000000`, `00`).
 */
export function exportCsv(id: string, version: number | null, dir: string): Promise<string[]> {
  return unwrap(commands.careplanExportCsv(id, dir, version, null, null));
}
