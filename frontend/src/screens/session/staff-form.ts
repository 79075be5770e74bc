// The checks a staff account form makes before asking the engine (the engine checks again).

export type StaffField = 'login' | 'name' | 'password';

/** Shortest staff password, in characters (as the engine requires). */
export const PASSWORD_CHARS_MIN = 8;

/** The first field that is not acceptable, or null. */
export function staffProblem(login: string, name: string, password: string): StaffField | null {
  const l = login.trim();
  if (l === '' || /\s/.test(l)) return 'login';
  if (name.trim() === '') return 'name';
  if ([...password].length < PASSWORD_CHARS_MIN) return 'password';
  return null;
}

/** The i18n key of the sentence for a field's problem. */
export function staffProblemKey(f: StaffField): string {
  return f === 'login'
    ? 'session.staff.loginInvalid'
    : f === 'name'
      ? 'session.staff.nameEmpty'
      : 'session.staff.passwordShort';
}
