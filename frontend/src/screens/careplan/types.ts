// The care plan as the engine sends it (the JSON of musubi-facility's `PlanView` / `PlanSummary`,
// i.e. musubi-crdt's `CarePlan` flattened with the document id). Choices travel as the form's words
// (`要介護2`, `認定済`, `一人暮らし`, `男`); dates as `YYYY-MM-DD`; times as `HH:MM`.
//
// These mirror the generated types (`$lib/bindings`), which name two different types `Need` (the
// care plan's and the shelter's); `plan-api.ts` passes values both ways between these and the
// generated commands, so any drift fails `npm run check` there. The choice lists are checked below.

import type * as gen from '$lib/api';

/** 要介護状態区分, in form order (the form's words are what the engine sends and accepts). */
export const CARE_LEVELS = ['事業対象者', '要支援1', '要支援2', '要介護1', '要介護2', '要介護3', '要介護4', '要介護5'] as const satisfies readonly gen.CareLevel[];
export type CareLevel = (typeof CARE_LEVELS)[number];

/** 認定済・申請中. */
export const CERTIFICATIONS = ['認定済', '申請中'] as const satisfies readonly gen.Certification[];
export type Certification = (typeof CERTIFICATIONS)[number];

/** 生活援助中心型の算定理由. */
export const HOUSEWORK_REASONS = ['一人暮らし', '家族等が障害、疾病等', 'その他'] as const satisfies readonly gen.HouseworkReason[];
export type HouseworkReason = (typeof HOUSEWORK_REASONS)[number];

/** 性別. */
export const SEXES = ['男', '女'] as const satisfies readonly gen.Sex[];
export type Sex = (typeof SEXES)[number];

/** 月〜日, the form's column order (what the engine stores and sends). */
export const WEEKDAYS = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'] as const satisfies readonly gen.Weekday[];
export type Weekday = (typeof WEEKDAYS)[number];

export interface PlanCategory {
  initial: boolean;
  referral: boolean;
  continuing: boolean;
}

export interface Resident {
  name: string;
  kana: string;
  sex: Sex | null;
  birth_date: string;
  postal_code: string;
  address: string;
  phone: string;
}

export interface Office {
  name: string;
  code: string;
  postal_code: string;
  address: string;
}

export interface Consent {
  date: string;
  by: string;
}

/** 第1表. */
export interface Sheet1 {
  created_on: string;
  changed_on: string;
  first_created_on: string;
  category: PlanCategory;
  certification: Certification | null;
  certified_on: string;
  valid_from: string;
  valid_to: string;
  care_level: CareLevel | null;
  resident: Resident;
  insurer_number: string;
  insured_number: string;
  assessment: string;
  committee_opinion: string;
  policy: string;
  housework_reason: HouseworkReason | null;
  housework_reason_other: string;
  planner: string;
  office: Office;
  consent: Consent;
}

/** 援助内容 (a service row of 第2表). */
export interface Service {
  id: string;
  content: string;
  insured: boolean;
  kind: string;
  provider: string;
  provider_code: string;
  frequency: string;
  period: string;
}

export interface ShortTermGoal {
  id: string;
  text: string;
  period: string;
  services: Service[];
}

export interface LongTermGoal {
  id: string;
  text: string;
  period: string;
  short_goals: ShortTermGoal[];
}

/** 生活全般の解決すべき課題（ニーズ）. */
export interface Need {
  id: string;
  text: string;
  goals: LongTermGoal[];
}

export interface WeeklyEntry {
  id: string;
  day: Weekday;
  start: string;
  end: string;
  service: string;
}

export interface Activity {
  id: string;
  start: string;
  end: string;
  text: string;
}

/** 第3表. */
export interface WeeklyPlan {
  entries: WeeklyEntry[];
  activities: Activity[];
  non_weekly: string;
}

export interface Author {
  facility: string;
  facility_name: string;
  staff: string;
}

/** 第5表 居宅介護支援経過: one entry. */
export interface LogEntry extends Author {
  id: string;
  date: string;
  time: string;
  category: string;
  text: string;
  recorded_at: string;
}

export interface MonitoringEntry extends Author {
  id: string;
  date: string;
  goal: string;
  text: string;
  recorded_at: string;
}

export interface Comment extends Author {
  id: string;
  at: string;
  about: string;
  text: string;
}

export interface VersionInfo extends Author {
  number: number;
  id: string;
  created_on: string;
  changed_on: string;
  note: string;
  recorded_at: string;
  heads: string[];
}

/** One plan as shown (the current plan, or a recorded version when `version` is set). */
export interface PlanView {
  id: string;
  version?: number | null;
  sheet1: Sheet1;
  needs: Need[];
  weekly: WeeklyPlan;
  support_log: LogEntry[];
  monitoring: MonitoringEntry[];
  comments: Comment[];
  versions: VersionInfo[];
  unreadable_bundles?: number;
}

/** One line of the plan list. */
export interface PlanSummary {
  id: string;
  resident: string;
  birth_date: string;
  care_level: string;
  created_on: string;
  changed_on: string;
  planner: string;
  consented_on: string;
  needs: number;
  versions: number;
}

/** Where an item goes among its siblings (the move and add commands' placement). */
export type Placement = 'first' | 'last' | { before: string } | { after: string };

/** Which kind of item of 第2表 an id names. */
export type ItemKind = 'need' | 'long_term_goal' | 'short_term_goal' | 'service' | 'weekly_entry' | 'activity';

/** The keys of 第1表 the edit command accepts (musubi-crdt's `PlanField::key`). */
export type PlanField =
  | 'created_on'
  | 'changed_on'
  | 'first_created_on'
  | 'category'
  | 'certification'
  | 'certified_on'
  | 'valid_from'
  | 'valid_to'
  | 'care_level'
  | 'resident.name'
  | 'resident.kana'
  | 'resident.sex'
  | 'resident.birth_date'
  | 'resident.postal_code'
  | 'resident.address'
  | 'resident.phone'
  | 'insurer_number'
  | 'insured_number'
  | 'assessment'
  | 'committee_opinion'
  | 'policy'
  | 'housework_reason'
  | 'housework_reason_other'
  | 'planner'
  | 'office.name'
  | 'office.code'
  | 'office.postal_code'
  | 'office.address'
  | 'consent.date'
  | 'consent.by';

/** The value of a 第1表 field as the edit command takes it (choices as their words, category as `初回,継続`). */
export function fieldValue(s: Sheet1, field: PlanField): string {
  switch (field) {
    case 'category':
      return categoryValue(s.category);
    case 'certification':
      return s.certification ?? '';
    case 'care_level':
      return s.care_level ?? '';
    case 'housework_reason':
      return s.housework_reason ?? '';
    case 'resident.sex':
      return s.resident.sex ?? '';
  }
  const [a, b] = field.split('.') as [string, string | undefined];
  const top = (s as unknown as Record<string, unknown>)[a];
  if (b === undefined) return typeof top === 'string' ? top : '';
  const v = (top as Record<string, unknown> | undefined)?.[b];
  return typeof v === 'string' ? v : '';
}

/** 初回・紹介・継続 as the edit command's comma-separated value. */
export function categoryValue(c: PlanCategory): string {
  const parts: string[] = [];
  if (c.initial) parts.push('初回');
  if (c.referral) parts.push('紹介');
  if (c.continuing) parts.push('継続');
  return parts.join(',');
}

/** A blank 第1表 (what a new plan starts from before the form fills it). */
export function emptySheet1(): Sheet1 {
  return {
    created_on: '',
    changed_on: '',
    first_created_on: '',
    category: { initial: false, referral: false, continuing: false },
    certification: null,
    certified_on: '',
    valid_from: '',
    valid_to: '',
    care_level: null,
    resident: { name: '', kana: '', sex: null, birth_date: '', postal_code: '', address: '', phone: '' },
    insurer_number: '',
    insured_number: '',
    assessment: '',
    committee_opinion: '',
    policy: '',
    housework_reason: null,
    housework_reason_other: '',
    planner: '',
    office: { name: '', code: '', postal_code: '', address: '' },
    consent: { date: '', by: '' },
  };
}

/**
 * Records in `s` a value the engine acknowledged for `field` (as `fieldValue` reads it back), so the
 * plan held here matches the engine until the next reload.
 */
export function setFieldValue(s: Sheet1, field: PlanField, value: string) {
  const obj = s as unknown as Record<string, Record<string, unknown> | unknown>;
  switch (field) {
    case 'category':
      s.category = {
        initial: value.includes('初回'),
        referral: value.includes('紹介'),
        continuing: value.includes('継続'),
      };
      return;
    case 'certification':
      s.certification = (value || null) as Certification | null;
      return;
    case 'care_level':
      s.care_level = (value || null) as CareLevel | null;
      return;
    case 'housework_reason':
      s.housework_reason = (value || null) as HouseworkReason | null;
      return;
    case 'resident.sex':
      s.resident.sex = (value || null) as Sex | null;
      return;
  }
  const [a, b] = field.split('.') as [string, string | undefined];
  if (b === undefined) obj[a] = value;
  else (obj[a] as Record<string, unknown>)[b] = value;
}

// Every generated choice is one this screen offers (fails to compile when the engine adds one).
type Covers<Ours, Theirs extends Ours> = Theirs;
export type _Checked = [
  Covers<CareLevel, gen.CareLevel>,
  Covers<Certification, gen.Certification>,
  Covers<HouseworkReason, gen.HouseworkReason>,
  Covers<Sex, gen.Sex>,
  Covers<Weekday, gen.Weekday>,
  Covers<ItemKind, gen.ItemKind>,
  Covers<PlanField, gen.PlanField>,
  Covers<Placement, gen.PlacementInput>,
];
